"""Intents: their JSON form, and what each real GitHub payload turns into (no I/O)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from pydantic import ValidationError

from bot.intents import (
    ApproveIntent,
    CancelIntent,
    HelpIntent,
    InstallationIntent,
    Intent,
    RunIntent,
    StatusIntent,
    dump_intents,
    load_intents,
)
from bot.states import PipelineKind, RunMode
from tests.conftest import GITHUB_FIXTURES
from webhooks.event import Delivery, PayloadError, Rules
from webhooks.router import route


def payload(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GITHUB_FIXTURES / "webhooks" / f"{name}.json").read_text())
    return data


def intents_of(
    name: str, rules: Rules | None = None, data: dict[str, Any] | None = None
) -> list[Intent]:
    data = payload(name) if data is None else data
    action = data.get("action")
    delivery = Delivery(name.split(".", maxsplit=1)[0], action, "d-1", data)
    return route(delivery, rules or Rules())


def comment_payload(
    body: str, *, on_pull: bool = False, sender_type: str = "User"
) -> dict[str, Any]:
    # The real examples have no comment on a PR: GitHub sends those as issue_comment whose issue has
    # a `pull_request` member, derived here from the real issue_comment.created.json.
    data = payload("issue_comment.created")
    data["comment"]["body"] = body
    data["sender"]["type"] = sender_type
    if on_pull:
        number = data["issue"]["number"]
        base = f"https://api.github.com/repos/Codertocat/Hello-World/pulls/{number}"
        data["issue"]["pull_request"] = {
            "url": base,
            "html_url": f"https://github.com/Codertocat/Hello-World/pull/{number}",
            "diff_url": f"https://github.com/Codertocat/Hello-World/pull/{number}.diff",
            "patch_url": f"https://github.com/Codertocat/Hello-World/pull/{number}.patch",
            "merged_at": None,
        }
    return data


# --- JSON form ---------------------------------------------------------------------------------


def test_intents_round_trip_through_json() -> None:
    common: dict[str, Any] = {
        "installation_id": 7,
        "sender": "octocat",
        "sender_type": "User",
        "delivery_id": "abc",
    }
    where: dict[str, Any] = {**common, "repo": "o/r", "kind": PipelineKind.PULL, "number": 3}
    intents: list[Intent] = [
        RunIntent(
            **where,
            trigger="command",
            instructions="do it",
            mode=RunMode.TESTS,
            comment_id=9,
            comment_kind="review",
            head_sha="a" * 40,
            is_fork=True,
        ),
        CancelIntent(**where, reason="command"),
        StatusIntent(**where),
        HelpIntent(**where, unknown="rety", suggestion="retry"),
        ApproveIntent(**where),
        InstallationIntent(**common, action="added", account="o", repositories=["o/r"]),
    ]
    text = dump_intents(intents)
    assert [item["type"] for item in json.loads(text)] == [
        "run",
        "cancel",
        "status",
        "help",
        "approve",
        "installation",
    ]
    assert load_intents(text) == intents


def test_loading_refuses_an_unknown_type() -> None:
    with pytest.raises(ValidationError):
        load_intents('[{"type": "explode", "repo": "o/r"}]')


def test_a_label_or_command_run_needs_its_issue_or_pr() -> None:
    with pytest.raises(ValidationError, match="needs kind and number"):
        RunIntent(
            installation_id=None,
            sender="a",
            sender_type="User",
            delivery_id="d",
            repo="o/r",
            trigger="label",
        )


# --- issues ----------------------------------------------------------------------------------


def test_issue_labeled_with_the_trigger_label_starts_a_run() -> None:
    # The real example adds the label "bug".
    [intent] = intents_of("issues.labeled", Rules(trigger_label="bug"))
    assert isinstance(intent, RunIntent)
    assert (intent.repo, intent.kind, intent.number, intent.trigger) == (
        "Codertocat/Hello-World",
        PipelineKind.ISSUE,
        1,
        "label",
    )
    assert intent.title == "Spelling error in the README file"
    assert "spelled 'commit'" in intent.body
    assert (intent.sender, intent.installation_id, intent.delivery_id) == (
        "Codertocat",
        None,
        "d-1",
    )


def test_issue_labeled_with_another_label_does_nothing() -> None:
    assert intents_of("issues.labeled", Rules(trigger_label="trimo")) == []


def test_label_names_ignore_case() -> None:
    assert len(intents_of("issues.labeled", Rules(trigger_label="BUG"))) == 1


def test_issue_unlabeled_and_closed_cancel() -> None:
    # No real issues.unlabeled / issues.closed example exists: derived from issues.labeled.
    data = payload("issues.labeled")
    data["action"] = "unlabeled"
    [unlabeled] = intents_of("issues.labeled", Rules(trigger_label="bug"), data)
    data["action"] = "closed"
    [closed] = intents_of("issues.labeled", Rules(trigger_label="trimo"), data)
    assert isinstance(unlabeled, CancelIntent) and isinstance(closed, CancelIntent)
    assert (unlabeled.reason, unlabeled.number, closed.reason) == ("unlabeled", 1, "closed")


# --- pull requests -----------------------------------------------------------------------------


def test_pr_labeled_starts_a_run_on_its_head() -> None:
    [intent] = intents_of("pull_request.labeled", Rules(trigger_label="bug"))
    assert isinstance(intent, RunIntent)
    assert (intent.kind, intent.number, intent.installation_id) == (PipelineKind.PULL, 2, 1)
    assert intent.head_sha == "ec26c3e57ca3a959ca5aad62de7213c562f8c821"
    assert (intent.head_ref, intent.head_repo, intent.is_fork) == (
        "changes",
        "Codertocat/Hello-World",
        False,
    )


def test_pr_from_a_fork_is_marked_as_such() -> None:
    data = payload("pull_request.labeled")
    data["pull_request"]["head"]["repo"]["full_name"] = "mallory/Hello-World"
    [intent] = intents_of("pull_request.labeled", Rules(trigger_label="bug"), data)
    assert isinstance(intent, RunIntent) and intent.is_fork is True


def test_pr_closed_cancels_and_synchronize_does_nothing() -> None:
    [intent] = intents_of("pull_request.closed")
    assert isinstance(intent, CancelIntent)
    assert (intent.kind, intent.number, intent.reason) == (PipelineKind.PULL, 2, "closed")
    assert intents_of("pull_request.synchronize") == []


# --- comments ----------------------------------------------------------------------------------


def test_the_real_comment_has_no_command() -> None:
    assert intents_of("issue_comment.created") == []
    assert intents_of("pull_request_review_comment.created") == []


def test_run_command_on_an_issue() -> None:
    data = comment_payload("Please\n/trimo run add a test for it")
    [intent] = intents_of("issue_comment.created", data=data)
    assert isinstance(intent, RunIntent)
    assert (intent.kind, intent.number, intent.trigger, intent.instructions) == (
        PipelineKind.ISSUE,
        1,
        "command",
        "add a test for it",
    )
    assert (intent.comment_id, intent.comment_kind, intent.mode) == (492700400, "issue", "agent")


def test_command_on_a_pr_conversation_leaves_the_head_to_the_worker() -> None:
    [intent] = intents_of(
        "issue_comment.created", data=comment_payload("/trimo test", on_pull=True)
    )
    assert isinstance(intent, RunIntent)
    assert (intent.kind, intent.mode, intent.head_sha, intent.is_fork) == (
        PipelineKind.PULL,
        RunMode.TESTS,
        None,
        None,
    )


def test_review_comment_command_carries_the_head() -> None:
    data = payload("pull_request_review_comment.created")
    data["comment"]["body"] = "/trimo retry"
    [intent] = intents_of("pull_request_review_comment.created", data=data)
    assert isinstance(intent, RunIntent)
    assert (intent.retry, intent.comment_kind, intent.comment_id) == (True, "review", 284312630)
    assert intent.head_sha == data["pull_request"]["head"]["sha"] and intent.is_fork is False


def test_bots_are_ignored() -> None:
    bot = comment_payload("/trimo retry", sender_type="Bot")
    assert intents_of("issue_comment.created", data=bot) == []
    app = comment_payload("/trimo retry")
    app["sender"]["login"] = "trimo[bot]"
    assert intents_of("issue_comment.created", data=app) == []


def test_one_comment_gives_one_run_the_last_and_each_answer_once() -> None:
    body = "\n".join(
        [
            "/trimo run first",
            "/trimo status",
            "/trimo stop",
            "/trimo rety",
            "/trimo help",
            "/trimo test",
            "/trimo status",
        ]
    )
    intents = intents_of("issue_comment.created", data=comment_payload(body, on_pull=True))
    assert [type(i) for i in intents] == [StatusIntent, CancelIntent, HelpIntent, RunIntent]
    help_intent, run = intents[2], intents[3]
    assert isinstance(help_intent, HelpIntent) and help_intent.suggestion == "retry"
    assert isinstance(run, RunIntent) and run.mode is RunMode.TESTS


def test_approve_on_a_pr() -> None:
    [intent] = intents_of(
        "issue_comment.created", data=comment_payload("/trimo approve", on_pull=True)
    )
    assert (
        isinstance(intent, ApproveIntent)
        and intent.number == 1
        and intent.kind is PipelineKind.PULL
    )


# --- check runs --------------------------------------------------------------------------------


def test_rerun_of_trimos_check_run_retries() -> None:
    # The real example's check run belongs to App id 2.
    [intent] = intents_of("check_run.rerequested", Rules(app_id=2))
    assert isinstance(intent, RunIntent)
    assert (intent.trigger, intent.retry, intent.check_run_id) == ("check_run", True, 4)
    assert intent.head_sha == "d6fde92930d4715a2b49857d24b940956b26d2d3"


def test_rerun_of_another_apps_check_run_is_ignored() -> None:
    assert intents_of("check_run.rerequested", Rules(app_id=29310)) == []
    # Without an App id, Trimo's check runs are known by name ("randscape" here).
    assert intents_of("check_run.rerequested", Rules(app_id=None)) == []
    assert (
        len(intents_of("check_run.rerequested", Rules(app_id=None, check_run_name="randscape")))
        == 1
    )


# --- installations -----------------------------------------------------------------------------


def test_installation_events() -> None:
    [created] = intents_of("installation.created")
    [deleted] = intents_of("installation.deleted")
    [added] = intents_of("installation_repositories.added")
    assert isinstance(created, InstallationIntent)
    assert (created.action, created.installation_id, created.account, created.repositories) == (
        "created",
        957387,
        "Codertocat",
        ["Codertocat/Hello-World"],
    )
    assert isinstance(deleted, InstallationIntent) and deleted.installation_id == 2
    assert isinstance(added, InstallationIntent)
    assert (added.action, added.repositories) == ("added", ["Codertocat/Space"])


def test_other_events_give_nothing() -> None:
    assert intents_of("push") == []
    assert intents_of("check_suite.rerequested") == []


def test_a_payload_missing_a_field_is_a_payload_error() -> None:
    data = copy.deepcopy(payload("pull_request.labeled"))
    del data["pull_request"]["head"]
    with pytest.raises(PayloadError, match=r"pull_request\.labeled.*'head'"):
        intents_of("pull_request.labeled", Rules(trigger_label="bug"), data)
    data = payload("issues.labeled")
    data["issue"]["number"] = "one"
    with pytest.raises(PayloadError, match="number"):
        intents_of("issues.labeled", Rules(trigger_label="bug"), data)
