"""The GitHub client and its write policy, and the fake GitHub's own request validation."""

# ruff: noqa: F811  (the fixture is imported so pytest finds it; tests name it to get it)

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from bot.github.client import GitHubClient, GitHubError, GitHubWriteError
from tests.github_fake import BOT_LOGIN, FakeGitHub, fake_github  # noqa: F401

MARKED = "<!-- trimo:run=5 -->\nTrimo is on it."


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(fake_github: FakeGitHub, sleeps: list[float]) -> Iterator[GitHubClient]:
    fake_github.add_repo("octo/hello")
    fake_github.add_issue("octo/hello", title="Make it faster")
    gh = GitHubClient(
        fake_github.issue_token(), fake_github.base_url, write_interval=0, sleep=sleeps.append
    )
    yield gh
    gh.close()


# ---- the fake's validator is real -----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "complaint"),
    [({"body": 42}, "42 is not of type 'string'"), ({}, "'body' is a required property")],
)
def test_fake_reports_a_body_the_spec_rejects(body: dict[str, object], complaint: str) -> None:
    fake = FakeGitHub()
    with fake:
        fake.add_repo("octo/hello")
        fake.add_issue("octo/hello")
        requests.post(
            "https://api.github.com/repos/octo/hello/issues/1/comments",
            json=body,
            headers={"Authorization": f"token {fake.issue_token()}"},
            timeout=5,
        )
        assert len(fake.violations) == 1
        assert "POST /repos/octo/hello/issues/1/comments" in fake.violations[0]
        assert complaint in fake.violations[0]
        fake.violations.clear()


def test_fake_reports_an_operation_outside_the_subset() -> None:
    unknown = r"DELETE /repos/octo/hello: not an operation"
    with pytest.raises(AssertionError, match=unknown), FakeGitHub():
        response = requests.delete("https://api.github.com/repos/octo/hello", timeout=5)
        assert response.status_code == 404


def test_fake_reports_the_bare_label_array() -> None:
    fake = FakeGitHub(check_auth=False)
    with fake:
        fake.add_repo("octo/hello")
        fake.add_issue("octo/hello")
        requests.post(
            "https://api.github.com/repos/octo/hello/issues/1/labels", json=["bug"], timeout=5
        )
        assert "not valid under any of the given schemas" in fake.violations[0]
        fake.violations.clear()


# ---- reads ----------------------------------------------------------------------------------


def test_get_repo(client: GitHubClient) -> None:
    info = client.get_repo("octo", "hello")
    assert (info.full_name, info.default_branch, info.private) == ("octo/hello", "main", False)
    assert info.clone_url == "https://github.com/octo/hello.git"


@pytest.mark.parametrize("role", ["admin", "maintain", "write", "triage", "read"])
def test_permission_is_the_exact_role(
    fake_github: FakeGitHub, client: GitHubClient, role: str
) -> None:
    fake_github.set_permission("alice", role)
    assert client.get_permission("octo", "hello", "alice") == role


def test_unknown_user_has_no_permission(client: GitHubClient) -> None:
    assert client.get_permission("octo", "hello", "mallory") == "none"


def test_get_file_decodes_content(fake_github: FakeGitHub, client: GitHubClient) -> None:
    fake_github.set_file("octo/hello", ".trimo/config.yml", "agent: claude\n" * 20)
    assert client.get_file("octo", "hello", ".trimo/config.yml") == b"agent: claude\n" * 20
    assert client.get_file("octo", "hello", ".trimo/missing.yml") is None


def test_list_comments_follows_pages(fake_github: FakeGitHub, client: GitHubClient) -> None:
    for i in range(130):
        fake_github.add_comment("octo/hello", 1, f"comment {i}")
    comments = client.list_comments("octo", "hello", 1)
    assert [c.body for c in comments] == [f"comment {i}" for i in range(130)]
    assert len(fake_github.requests_to("GET", r"/issues/1/comments$")) == 2


# ---- writes ---------------------------------------------------------------------------------


def test_comment_is_posted_and_edited(fake_github: FakeGitHub, client: GitHubClient) -> None:
    comment_id, url = client.create_comment("octo", "hello", 1, MARKED)
    client.update_comment("octo", "hello", comment_id, MARKED + "\nDone.")
    client.add_reaction("octo", "hello", comment_id)

    (comment,) = fake_github.comments_on("octo/hello", 1)
    assert comment["body"] == MARKED + "\nDone."
    assert comment["user"]["login"] == BOT_LOGIN
    assert url == f"https://github.com/octo/hello/issues/1#issuecomment-{comment_id}"
    assert [r["content"] for r in fake_github.reactions] == ["eyes"]
    # One request each: no hidden GET before an edit.
    assert [r.method for r in fake_github.requests] == ["POST", "PATCH", "POST"]


def test_502_after_github_posted_does_not_post_twice(
    fake_github: FakeGitHub, client: GitHubClient, sleeps: list[float]
) -> None:
    fake_github.fail_next("POST", r"/issues/1/comments$", 502, apply=True)
    comment_id, _ = client.create_comment("octo", "hello", 1, MARKED)

    assert [c["id"] for c in fake_github.comments_on("octo/hello", 1)] == [comment_id]
    assert len(fake_github.requests_to("POST", r"/comments$")) == 1
    assert sleeps == [2.0]


def test_502_then_201_posts_exactly_one_comment(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    fake_github.fail_next("POST", r"/issues/1/comments$", 502)
    client.create_comment("octo", "hello", 1, MARKED)
    assert len(fake_github.comments_on("octo/hello", 1)) == 1
    assert len(fake_github.requests_to("POST", r"/comments$")) == 2


def test_server_errors_back_off_then_give_up_loudly(
    fake_github: FakeGitHub, client: GitHubClient, sleeps: list[float]
) -> None:
    fake_github.fail_next("PATCH", r"/issues/comments/", 503, times=10)
    comment_id, _ = client.create_comment("octo", "hello", 1, "x")
    with pytest.raises(GitHubWriteError, match=r"after 6 attempts \(last: HTTP 503"):
        client.update_comment("octo", "hello", comment_id, "y")
    assert sleeps == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert fake_github.comments[comment_id]["body"] == "x"


def test_rate_limit_honours_retry_after_in_real_time(fake_github: FakeGitHub) -> None:
    fake_github.add_repo("octo/hello")
    fake_github.add_issue("octo/hello")
    fake_github.fail_next("POST", r"/comments$", 403, headers={"retry-after": "1"})
    client = GitHubClient(fake_github.issue_token(), write_interval=0)
    started = time.monotonic()
    client.create_comment("octo", "hello", 1, "after the limit")
    assert time.monotonic() - started >= 1.0
    assert len(fake_github.comments_on("octo/hello", 1)) == 1


def test_rate_limit_waits_for_the_reset(
    fake_github: FakeGitHub, client: GitHubClient, sleeps: list[float]
) -> None:
    reset = int(time.time()) + 30
    fake_github.fail_next(
        "POST",
        r"/comments$",
        429,
        headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)},
    )
    client.create_comment("octo", "hello", 1, "x")
    assert len(sleeps) == 1
    assert 29 <= sleeps[0] <= 32


def test_secondary_rate_limit_without_hints_waits_a_minute_and_more(
    fake_github: FakeGitHub, client: GitHubClient, sleeps: list[float]
) -> None:
    fake_github.fail_next("POST", r"/comments$", 403, times=2)
    client.create_comment("octo", "hello", 1, "x")
    assert sleeps == [60.0, 120.0]


def test_forbidden_without_rate_limit_fails_at_once(
    fake_github: FakeGitHub, client: GitHubClient, sleeps: list[float]
) -> None:
    fake_github.fail_next(
        "POST", r"/comments$", 403, body={"message": "Resource not accessible by integration"}
    )
    with pytest.raises(GitHubError, match="HTTP 403: Resource not accessible by integration"):
        client.create_comment("octo", "hello", 1, "x")
    assert sleeps == []


def test_writes_to_one_installation_are_serialized_and_spaced(fake_github: FakeGitHub) -> None:
    fake_github.add_repo("octo/hello")
    fake_github.add_issue("octo/hello")
    token = fake_github.issue_token()
    # Two clients for the same installation, as two threads of the worker would have.
    clients = [GitHubClient(token, installation=4242, write_interval=0.2) for _ in range(2)]
    threads = [
        threading.Thread(target=clients[i % 2].create_comment, args=("octo", "hello", 1, str(i)))
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fake_github.comments_on("octo/hello", 1)) == 4
    arrivals = [r.at for r in fake_github.requests_to("POST", r"/comments$")]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) >= 0.19


# ---- check runs and pull requests -------------------------------------------------------------


def test_annotations_go_out_fifty_at_a_time(fake_github: FakeGitHub, client: GitHubClient) -> None:
    annotation = {
        "path": "src/app.py",
        "start_line": 3,
        "end_line": 3,
        "annotation_level": "failure",
        "message": "assert 1 == 2",
    }
    check_id = client.create_check_run(
        "octo", "hello", "a" * 40, "trimo", status="in_progress", external_id="5"
    )
    client.update_check_run(
        "octo",
        "hello",
        check_id,
        conclusion="failure",
        output={"title": "Tests", "summary": "2 failed", "annotations": [annotation] * 120},
    )
    history = fake_github.check_run_history[check_id]
    assert [len(h.get("output", {}).get("annotations", [])) for h in history] == [0, 50, 50, 20]
    assert [h.get("conclusion") for h in history] == [None, None, None, "failure"]
    run = fake_github.check_runs[check_id]
    assert (run["status"], run["conclusion"]) == ("completed", "failure")
    assert run["output"]["annotations_count"] == 120


def test_check_run_create_after_502_is_found_not_repeated(
    fake_github: FakeGitHub, client: GitHubClient
) -> None:
    fake_github.fail_next("POST", r"/check-runs$", 502, apply=True)
    check_id = client.create_check_run("octo", "hello", "b" * 40, "trimo", external_id="9")
    assert list(fake_github.check_runs) == [check_id]


def test_draft_pull_request_is_opened_once(fake_github: FakeGitHub, client: GitHubClient) -> None:
    number, url = client.create_pull(
        "octo", "hello", head="trimo/issue-1", base="main", title="Make it faster", body="Fixes #1"
    )
    assert client.find_pull("octo", "hello", "trimo/issue-1") == (number, url)
    assert client.find_pull("octo", "hello", "other") is None
    # A restart asks again: the open one comes back, no second pull request.
    again = client.create_pull(
        "octo", "hello", head="trimo/issue-1", base="main", title="Make it faster", body="x"
    )
    assert again == (number, url)
    pull = fake_github.pulls[("octo/hello", number)]
    assert (pull["draft"], pull["head"]["ref"], pull["base"]["ref"]) == (
        True,
        "trimo/issue-1",
        "main",
    )
    assert url == f"https://github.com/octo/hello/pull/{number}"


def test_get_pull_of_a_fork(fake_github: FakeGitHub, client: GitHubClient) -> None:
    pull = fake_github.add_pull("octo/hello", head="patch-1", head_repo="mallory/hello")
    info = client.get_pull("octo", "hello", pull["number"])
    assert info.head_repo == "mallory/hello"
    assert (info.head_ref, info.base_ref, info.head_sha) == ("patch-1", "main", pull["head"]["sha"])


def test_labels_and_review_replies(fake_github: FakeGitHub, client: GitHubClient) -> None:
    client.add_labels("octo", "hello", 1, ["trimo"])
    client.remove_label("octo", "hello", 1, "trimo")
    client.remove_label("octo", "hello", 1, "trimo")  # already gone: fine
    pull = fake_github.add_pull("octo/hello", head="feature")
    review = fake_github.add_review_comment("octo/hello", pull["number"], "/trimo run tidy this")
    client.add_reaction("octo", "hello", review["id"], "+1", review_comment=True)
    reply_id, _ = client.reply_review_comment("octo", "hello", pull["number"], review["id"], "ok")
    assert fake_github.labels[("octo/hello", 1)] == []
    assert fake_github.review_comments[reply_id]["in_reply_to_id"] == review["id"]
    assert fake_github.reactions[0]["content"] == "+1"


def test_ghes_api_root(sleeps: list[float]) -> None:
    with FakeGitHub("https://ghe.example.test/api/v3") as fake:
        fake.add_repo("octo/hello")
        fake.add_issue("octo/hello")
        client = GitHubClient(fake.issue_token(), fake.base_url, write_interval=0)
        _, url = client.create_comment("octo", "hello", 1, MARKED)
        assert url.startswith("https://ghe.example.test/octo/hello/issues/1#issuecomment-")
        assert client.get_repo("octo", "hello").default_branch == "main"
        assert fake.requests[0].path == "/repos/octo/hello/issues/1/comments"


def test_client_follows_token_renewal(fake_github: FakeGitHub) -> None:
    fake_github.add_repo("octo/hello")
    tokens = iter([fake_github.issue_token(), fake_github.issue_token()])
    current = [next(tokens)]
    client = GitHubClient(lambda: current[0], write_interval=0)
    client.get_repo("octo", "hello")
    current[0] = next(tokens)
    client.get_repo("octo", "hello")
    sent = [r.headers["Authorization"] for r in fake_github.requests]
    assert sent[0] != sent[1]
    assert sent[1] == f"token {current[0]}"
