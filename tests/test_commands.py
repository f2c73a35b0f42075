"""The `/trimo` comment-command grammar."""

from __future__ import annotations

import pytest

from bot.commands import HELP_TEXT, KNOWN_VERBS, Command, Verb, parse_commands


def test_each_verb_is_recognised() -> None:
    body = "\n".join(f"/trimo {verb}" for verb in KNOWN_VERBS)
    assert [c.verb for c in parse_commands(body)] == [Verb(v) for v in KNOWN_VERBS]


def test_run_takes_the_rest_of_the_line_as_instructions() -> None:
    assert parse_commands("/trimo run Fix the flaky test in  tests/test_api.py ") == [
        Command(Verb.RUN, arg="Fix the flaky test in  tests/test_api.py")
    ]


def test_run_alone_takes_the_following_lines_up_to_the_next_command() -> None:
    body = "Thanks!\n/trimo run\nUse the new API.\n\nAlso update the docs.\n/trimo status\nbye"
    assert parse_commands(body) == [
        Command(Verb.RUN, arg="Use the new API.\n\nAlso update the docs."),
        Command(Verb.STATUS),
    ]


def test_run_instructions_may_hold_a_fenced_block_with_a_command_inside() -> None:
    body = "/trimo run\nMake this pass:\n```\n/trimo stop\n```\n"
    assert parse_commands(body) == [Command(Verb.RUN, arg="Make this pass:\n```\n/trimo stop\n```")]


def test_run_without_any_instructions_has_none() -> None:
    assert parse_commands("/trimo run") == [Command(Verb.RUN)]


def test_leading_whitespace_and_crlf_are_accepted() -> None:
    assert parse_commands("hello\r\n   /trimo retry\r\n") == [Command(Verb.RETRY)]


def test_prefix_and_verb_ignore_case_but_instructions_keep_it() -> None:
    assert parse_commands("/Trimo RUN Rename Foo to Bar") == [
        Command(Verb.RUN, arg="Rename Foo to Bar")
    ]


@pytest.mark.parametrize(
    ("opening", "closing"),
    [("```", "```"), ("~~~", "~~~"), ("````", "`````"), ("```python", "```")],
)
def test_commands_in_fenced_code_are_ignored(opening: str, closing: str) -> None:
    body = f"To retry, type:\n{opening}\n/trimo retry\n{closing}\n/trimo status"
    assert parse_commands(body) == [Command(Verb.STATUS)]


def test_a_fence_closes_only_with_its_own_character_and_length() -> None:
    assert parse_commands("````\n```\n/trimo stop\n````") == []


def test_a_tilde_fence_is_not_closed_by_backticks() -> None:
    body = "~~~\n```\n/trimo stop\n~~~\n/trimo test"
    assert parse_commands(body) == [Command(Verb.TEST)]


def test_an_unclosed_fence_hides_the_rest() -> None:
    assert parse_commands("```\n/trimo stop") == []


def test_quoted_commands_are_ignored() -> None:
    assert parse_commands("> /trimo stop\n>/trimo retry\n  > /trimo run x") == []


def test_trimo_alone_means_help() -> None:
    assert parse_commands("/trimo") == [Command(Verb.HELP)]
    assert parse_commands("/trimo   ") == [Command(Verb.HELP)]


def test_a_longer_word_is_not_a_command() -> None:
    assert parse_commands("/trimoo run\n/trimo-run\nsee /trimo retry") == []


def test_unknown_verb_suggests_the_closest() -> None:
    assert parse_commands("/trimo rety") == [Command(Verb.UNKNOWN, arg="rety", suggestion="retry")]
    assert parse_commands("/trimo STAUTS") == [
        Command(Verb.UNKNOWN, arg="STAUTS", suggestion="status")
    ]


def test_unknown_verb_far_from_all_has_no_suggestion() -> None:
    assert parse_commands("/trimo xyzzy") == [Command(Verb.UNKNOWN, arg="xyzzy")]


def test_a_comment_without_commands_gives_nothing() -> None:
    assert parse_commands("") == []
    assert parse_commands("LGTM, thanks for /trimo") == []


def test_help_text_lists_every_verb() -> None:
    for verb in KNOWN_VERBS:
        assert f"`/trimo {verb}" in HELP_TEXT
