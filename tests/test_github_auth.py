"""App JWT and installation tokens, against the fake GitHub."""

# ruff: noqa: F811  (the fixture is imported so pytest finds it; tests name it to get it)

from __future__ import annotations

import logging
import threading
import time

import jwt
import pytest

from bot.github.auth import RUN_PERMISSIONS, AppAuth, GitHubAuthError
from bot.github.client import GitHubClient
from tests.github_fake import FakeGitHub, _public_key, app_private_key, fake_github  # noqa: F401


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def make_auth(fake: FakeGitHub, clock: Clock | None = None) -> AppAuth:
    if clock is not None:
        fake.clock = clock
    return AppAuth(fake.app_id, fake.private_key, fake.base_url, clock=clock or time.time)


def test_app_jwt_is_rs256_backdated_and_short_lived() -> None:
    auth = AppAuth(1234, app_private_key())
    before = int(time.time())
    claims = jwt.decode(
        auth.app_jwt(), _public_key(app_private_key()), algorithms=["RS256"], leeway=120
    )
    assert claims["iss"] == "1234"
    assert before - 61 <= claims["iat"] <= before - 59
    assert claims["exp"] - claims["iat"] <= 600
    assert claims["exp"] > before


def test_token_is_narrowed_to_the_repository_and_run_permissions(fake_github: FakeGitHub) -> None:
    fake_github.add_repo("octo/hello", installation_id=7)
    token = make_auth(fake_github).installation_token(7, "octo/hello")

    assert token.startswith("ghs_")
    assert fake_github.token_requests == [
        {"installation_id": 7, "repositories": ["hello"], "permissions": dict(RUN_PERMISSIONS)}
    ]
    # GitHub answers 404 when the narrowed token is used on another repository of the install.
    fake_github.add_repo("octo/other", installation_id=7)
    client = GitHubClient(token, fake_github.base_url, write_interval=0)
    assert client.get_repo("octo", "hello").default_branch == "main"
    with pytest.raises(Exception, match="404"):
        client.get_repo("octo", "other")


def test_token_is_cached_until_ten_minutes_before_expiry(fake_github: FakeGitHub) -> None:
    fake_github.add_repo("octo/hello")
    clock = Clock()
    auth = make_auth(fake_github, clock)

    first = auth.installation_token(1, "octo/hello")
    clock.now += 49 * 60
    assert auth.installation_token(1, "octo/hello") == first
    assert len(fake_github.token_requests) == 1

    clock.now += 2 * 60  # 9 minutes left: renewed before a push or a write can outlive it
    renewed = auth.installation_token(1, "octo/hello")
    assert renewed != first
    assert len(fake_github.token_requests) == 2

    # GitHub refused it anyway (revoked): a new one on request, cache or not.
    again = auth.installation_token(1, "octo/hello", renew=True)
    assert again not in (first, renewed)
    assert auth.installation_token(1, "octo/hello") == again


def test_each_repository_gets_its_own_token(fake_github: FakeGitHub) -> None:
    fake_github.add_repo("octo/a")
    fake_github.add_repo("octo/b")
    auth = make_auth(fake_github)
    assert auth.installation_token(1, "octo/a") != auth.installation_token(1, "octo/b")
    assert [r["repositories"] for r in fake_github.token_requests] == [["a"], ["b"]]


def test_concurrent_callers_share_one_token_request(fake_github: FakeGitHub) -> None:
    fake_github.add_repo("octo/hello")
    auth = make_auth(fake_github)
    tokens: list[str] = []
    threads = [
        threading.Thread(target=lambda: tokens.append(auth.installation_token(1, "octo/hello")))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(tokens)) == 1
    assert len(fake_github.token_requests) == 1


def test_no_token_reaches_the_log(
    fake_github: FakeGitHub, caplog: pytest.LogCaptureFixture
) -> None:
    fake_github.add_repo("octo/hello")
    fake_github.add_issue("octo/hello")
    caplog.set_level(logging.DEBUG)
    auth = make_auth(fake_github)
    client = GitHubClient.for_installation(auth, 1, "octo/hello", write_interval=0)
    client.create_comment("octo", "hello", 1, "hello")
    token = auth.installation_token(1, "octo/hello")

    assert "installation token for installation 1" in caplog.text  # the log does speak
    assert token not in caplog.text
    assert all(token not in repr(r.args) for r in caplog.records)
    assert token not in repr(auth)


def test_repo_installation_finds_the_id(fake_github: FakeGitHub) -> None:
    fake_github.add_repo("octo/hello", installation_id=99)
    assert make_auth(fake_github).repo_installation("octo", "hello") == 99


def test_missing_installation_says_to_install_the_app(fake_github: FakeGitHub) -> None:
    with pytest.raises(GitHubAuthError, match="not installed on octo/nowhere"):
        make_auth(fake_github).repo_installation("octo", "nowhere")


def test_wrong_app_id_names_the_setting(fake_github: FakeGitHub) -> None:
    fake_github.add_repo("octo/hello")
    auth = AppAuth(fake_github.app_id + 1, fake_github.private_key, fake_github.base_url)
    with pytest.raises(GitHubAuthError, match=r"HTTP 401.*TRIMO_GITHUB_APP_ID"):
        auth.installation_token(1, "octo/hello")


def test_repository_outside_the_installation_is_explained(fake_github: FakeGitHub) -> None:
    fake_github.add_repo("octo/hello", installation_id=2)
    with pytest.raises(GitHubAuthError, match=r"HTTP 422.*not part of the installation"):
        make_auth(fake_github).installation_token(1, "octo/hello")


def test_unusable_private_key_names_the_setting() -> None:
    with pytest.raises(GitHubAuthError, match="TRIMO_GITHUB_PRIVATE_KEY"):
        AppAuth(1, "not a pem").app_jwt()


def test_ghes_api_root() -> None:
    with FakeGitHub("https://ghe.example.test/api/v3") as fake:
        fake.add_repo("octo/hello")
        token = make_auth(fake).installation_token(1, "octo/hello")
        assert token in fake.tokens
        assert fake.requests[0].path == "/app/installations/1/access_tokens"
