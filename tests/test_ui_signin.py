"""Signing in to the run pages with GitHub, in headless Chromium, against the GitHub double:
who sees a run and who may press its buttons is GitHub's answer for their own token."""

# ruff: noqa: F811  (the fixture is imported so pytest finds it; tests name it to get it)

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.support.wait import WebDriverWait
from werkzeug.serving import make_server

from bot.settings import Settings
from bot.states import LIVE, PipelineKind, RunState
from bot.store import Store
from tests.browser import browser, page_text  # noqa: F401
from tests.github_fake import FakeGitHub, served_fake

REPO = "octo/secret-sauce"
CLIENT_ID = "Iv1.trimotest"
CLIENT_SECRET = "oauth-client-secret-for-tests"
WRITER, READER, OUTSIDER = "writer-ann", "reader-rob", "outsider-oz"


@dataclass
class Site:
    fake: FakeGitHub
    store: Store
    url: str
    run_id: int


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    from ui.app import init_app
    from webhooks.app import create_app

    with served_fake() as fake:
        fake.add_repo(REPO, private=True)
        fake.add_oauth_client(CLIENT_ID, CLIENT_SECRET)
        fake.set_permission(WRITER, "write", repo=REPO)
        fake.set_permission(READER, "read", repo=REPO)
        settings = Settings(
            data_dir=tmp_path,
            app_id=fake.app_id,
            private_key=fake.private_key,
            webhook_secrets=["s"],
            api_url=fake.base_url,
            web_url=fake.web_url,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
        )
        store = Store(settings.database_url)
        pipeline = store.get_or_create_pipeline(
            repo=REPO,
            key="issue:5",
            kind=PipelineKind.ISSUE,
            branch="trimo/5-sauce",
            title="Sauce",
            number=5,
        )
        run = store.create_run(pipeline.id, trigger="label", task="Make sauce", sender=WRITER)
        store.set_state(run.id, RunState.FAILED, expect=LIVE, reason="tests failed")
        # The receiver's app with the pages mounted, as `trimo serve` builds it.
        app = create_app(settings, store)
        init_app(app, settings, store)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield Site(fake, store, f"http://127.0.0.1:{server.server_port}", run.id)
        finally:
            server.shutdown()
            thread.join(timeout=10)
            store.close()
        assert not fake.violations, fake.violations


def _sign_in_as(browser: Any, site: Site, login: str, page: str) -> str:
    browser.delete_all_cookies()
    site.fake.signed_in = login
    browser.get(site.url + page)
    return page_text(browser)


def test_sign_in_shows_readers_the_run_refuses_their_retry_and_hides_it_from_others(
    site: Site, browser: Any
) -> None:
    page = f"/runs/{site.run_id}"
    # Not signed in: the page sends the browser through GitHub's authorize page and back.
    text = _sign_in_as(browser, site, READER, page)
    assert browser.current_url == site.url + page
    assert f"Run #{site.run_id}" in text and READER in text
    assert any(r.path == "/login/oauth/access_token" for r in site.fake.requests)
    # The session cookie is HTTP-only: scripts on the page cannot read it.
    assert browser.execute_script("return document.cookie") == ""
    assert all(c["httpOnly"] for c in browser.get_cookies() if c["name"] == "session")

    # A reader presses Retry: refused, and no run is queued.
    before = len(site.store.list_runs())
    browser.find_element("css selector", "button[name=retry]").click()
    page_text(browser, until=lambda text: "permission" in text)
    assert len(site.store.list_runs()) == before

    # Someone without read access: the run does not exist for them, nor in their list.
    text = _sign_in_as(browser, site, OUTSIDER, page)
    assert "not found" in text.lower() and f"Run #{site.run_id}" not in text
    browser.get(site.url + "/runs")
    assert f"#{site.run_id}" not in page_text(browser)

    # A writer's Retry queues a new run and shows its page.
    _sign_in_as(browser, site, WRITER, page)
    browser.find_element("css selector", "button[name=retry]").click()
    # A click returns before the form's POST does: wait for the browser to land on the new page.
    WebDriverWait(browser, 15).until(lambda b: b.current_url != site.url + page)
    runs = site.store.list_runs()
    assert len(runs) == before + 1 and runs[0].sender == WRITER
    assert browser.current_url == f"{site.url}/runs/{runs[0].id}"


def test_a_forged_callback_is_refused(site: Site, browser: Any) -> None:
    browser.get(f"{site.url}/signin/callback?code=stolen&state=guess")
    assert "sign in again" in page_text(browser)
    site.fake.signed_in = None  # nobody is signed in to GitHub in this browser
    browser.get(f"{site.url}/runs/{site.run_id}")
    text = page_text(browser)
    assert "Sign in to GitHub" in text and f"Run #{site.run_id}" not in text
