"""Secret masking in logs, events and reports."""

from __future__ import annotations

import time

from bot.masking import MASK, Masker


def test_every_occurrence_of_every_secret_is_masked() -> None:
    masker = Masker(["sk-ant-123456", "hunter2"])
    line = "token=sk-ant-123456 again sk-ant-123456, password hunter2!"
    assert masker.mask(line) == f"token={MASK} again {MASK}, password {MASK}!"


def test_a_secret_containing_another_is_masked_whole() -> None:
    masker = Masker(["abc", "abcdef-long"])
    assert masker.mask("key abcdef-long and abc") == f"key {MASK} and {MASK}"


def test_empty_and_very_short_values_are_ignored_but_three_characters_count() -> None:
    masker = Masker(["", None, "a", "no", "xyz"])
    assert masker.mask("a no xyz") == f"a no {MASK}"
    assert not Masker(["", "x"])
    assert Masker([]).mask("nothing to hide") == "nothing to hide"


def test_regex_characters_in_secrets_are_literal() -> None:
    masker = Masker(["p.ss+w*rd(1)", "a|b|c"])
    assert masker.mask("p.ss+w*rd(1) pXssw*rd a|b|c") == f"{MASK} pXssw*rd {MASK}"


def test_nested_data_is_masked_without_changing_the_original() -> None:
    masker = Masker(["s3cret"])
    data = {
        "env": {"TOKEN": "s3cret"},
        "argv": ["--key", "s3cret"],
        "n": 3,
        "t": ("s3cret",),
        "s3cret": None,
    }
    masked = masker.mask_obj(data)
    assert masked == {
        "env": {"TOKEN": MASK},
        "argv": ["--key", MASK],
        "n": 3,
        "t": (MASK,),
        MASK: None,
    }
    assert data["env"] == {"TOKEN": "s3cret"}


def test_the_masker_never_shows_its_secrets() -> None:
    masker = Masker(["s3cret-value"])
    assert "s3cret" not in repr(masker)


def test_masking_many_lines_is_fast() -> None:
    masker = Masker([f"secret-value-{i:03d}-{'x' * 20}" for i in range(50)])
    lines = [
        f"2024-05-02 step {i}: compiling module_{i}.py with flags -O2 -g" for i in range(20_000)
    ]
    lines[777] += " secret-value-007-" + "x" * 20
    start = time.perf_counter()
    masked = [masker.mask(line) for line in lines]
    elapsed = time.perf_counter() - start
    assert masked[777].endswith(MASK) and masked[0] == lines[0]
    assert elapsed < 1.0  # a chatty build prints this much in seconds; masking must keep up
