"""Creating the GitHub App from a fresh `trimo serve` (the manifest flow), in headless Chromium
against the GitHub double on a real socket: button → GitHub → callback → settings written →
a restarted `trimo serve` accepts webhooks signed with the new secret."""

# ruff: noqa: F811  (the fixture is imported so pytest finds it; tests name it to get it)

from __future__ import annotations

import hashlib
import hmac
import socket
import stat
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.browser import browser, page_text  # noqa: F401
from tests.conftest import GITHUB_FIXTURES
from tests.containers import trimo_free_env
from tests.github_fake import served_fake

pytestmark = pytest.mark.docker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_up(url: str, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trimo serve exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _signed(url: str, secret: str) -> requests.Response:
    body = (GITHUB_FIXTURES / "webhooks" / "ping.json").read_bytes()
    sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return requests.post(
        f"{url}/webhooks/github",
        data=body,
        timeout=10,
        headers={
            "Content-Type": "application/json",
            "X-GitHub-Event": "ping",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": sig,
        },
    )


def test_the_app_is_created_from_the_page_and_the_next_start_uses_it(
    tmp_path: Path, browser: Any, base_image: str
) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "data"
    with served_fake() as fake:
        env = trimo_free_env(
            TRIMO_DATA_DIR=str(data),
            TRIMO_PORT=str(port),
            TRIMO_API_URL=fake.base_url,
            TRIMO_WEB_URL=fake.web_url,
            TRIMO_PUBLIC_URL=url,
        )
        run = [sys.executable, "-m", "bot", "serve"]
        first = subprocess.Popen(
            run, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            _wait_up(url + "/", first)
            browser.get(url + "/")
            browser.find_element("id", "create").click()
            # The click returns before GitHub's round trip does: wait for the page it ends on.
            text = page_text(browser, until=lambda text: "created" in text, timeout=30)
            assert str(data / "github-app.toml") in text
        finally:
            _stop(first)

        (app,) = fake.created_apps
        # GitHub was asked for an App pointed at this Trimo, with the manifest's permissions.
        assert app["manifest"]["hook_attributes"]["url"] == f"{url}/webhooks/github"
        assert app["manifest"]["callback_urls"] == [f"{url}/signin/callback"]
        assert app["manifest"]["default_permissions"]["checks"] == "write"
        written = data / "github-app.toml"
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
        saved = tomllib.loads(written.read_text())
        assert saved["app_id"] == app["id"] and saved["client_id"] == app["client_id"]
        assert saved["webhook_secrets"] == [app["webhook_secret"]]
        assert saved["private_key"].startswith("-----BEGIN")

        second = subprocess.Popen(
            run, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            _wait_up(url + "/healthz", second)
            accepted = _signed(url, app["webhook_secret"])
            assert accepted.status_code in (200, 202), accepted.text
            assert _signed(url, "not-the-secret").status_code == 401
        finally:
            _stop(second)
        assert not fake.violations, fake.violations
