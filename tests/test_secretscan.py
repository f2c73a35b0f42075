"""The secret scan over real git history: every place and encoding a value can hide in a commit."""

from __future__ import annotations

import base64
from pathlib import Path
from urllib.parse import quote

import pytest

from bot.secretscan import (
    SecretInResult,
    SecretScanner,
    SecretTooShort,
    check_secret_value,
    refuse_secrets,
)
from tests.containers import git, make_repo

VALUE = "sk-live/7Hq+c9Zt!wX2 pL0"
SECRETS = {"DEPLOY_KEY": VALUE, "OTHER": "an-unrelated-value-42"}


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "repo"
    make_repo(path, {"README.md": "# r\n", "app.py": "x = 1\n"})
    return path, git(path, "rev-parse", "HEAD")


def commit(repo: Path, files: dict[str, bytes], message: str = "change") -> str:
    for name, data in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(data)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD")


def scan(repo: Path, base: str) -> list[str]:
    hits = SecretScanner(SECRETS).scan_range(repo, base, "HEAD")
    return [h.describe() for h in hits]


@pytest.mark.parametrize(
    ("encoded", "encoding"),
    [
        (VALUE.encode(), ""),
        (base64.b64encode(VALUE.encode()), ", base64-encoded"),
        (base64.b64encode(b"x" + VALUE.encode()), ", base64-encoded"),
        (base64.b64encode(b"xy" + VALUE.encode()), ", base64-encoded"),
        (base64.urlsafe_b64encode(b"x" + VALUE.encode()), ", base64-encoded"),
        (quote(VALUE, safe="").encode(), ", url-encoded"),
        (VALUE.encode().hex().encode(), ", hex-encoded"),
        (VALUE.encode().hex().upper().encode(), ", hex-encoded"),
    ],
)
def test_an_added_line_is_found_in_each_encoding(
    repo: tuple[Path, str], encoded: bytes, encoding: str
) -> None:
    path, base = repo
    sha = commit(path, {"conf/settings.txt": b"one\ntoken = " + encoded + b"\nthree\n"})
    assert scan(path, base) == [
        f"secret DEPLOY_KEY{encoding} (commit {sha[:12]}, added line conf/settings.txt line 2)"
    ]


def test_commit_message_file_name_and_binary_file(repo: tuple[Path, str]) -> None:
    path, base = repo
    first = commit(path, {"notes.md": b"nothing here\n"}, f"Add notes\n\nkey: {VALUE}\n")
    named = VALUE.replace("/", "_")  # a file name cannot hold a slash; the scan sees the rest
    second = commit(path, {"data/leak.bin": b"\x00\x01\xff" + VALUE.encode() + b"\x00\x02"})
    scanner = SecretScanner({"NAMED": named, **SECRETS})
    (path / named).write_text("x\n")
    git(path, "add", "-A")
    git(path, "commit", "-qm", "name")
    third = git(path, "rev-parse", "HEAD")
    found = [h.describe() for h in scanner.scan_range(path, base, "HEAD")]
    assert f"secret DEPLOY_KEY (commit {first[:12]}, commit message)" in found
    assert f"secret DEPLOY_KEY (commit {second[:12]}, added line data/leak.bin line 1)" in found
    # The name is the value: the report shows where, with the value itself blanked out.
    assert f"secret NAMED (commit {third[:12]}, file name ***)" in found
    assert VALUE not in " ".join(found)


def test_a_value_already_on_the_base_or_removed_is_not_a_hit(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    make_repo(path, {"fixture.txt": f"old {VALUE}\n", "other.txt": "a\n"})
    base = git(path, "rev-parse", "HEAD")
    commit(path, {"other.txt": b"a\nb\n", "fixture.txt": b"gone\n"})
    assert scan(path, base) == []


def test_a_secret_removed_in_a_later_commit_is_still_found(repo: tuple[Path, str]) -> None:
    path, base = repo
    sha = commit(path, {"leak.txt": VALUE.encode() + b"\n"})
    commit(path, {"leak.txt": b"cleaned up\n"})
    assert scan(path, base) == [
        f"secret DEPLOY_KEY (commit {sha[:12]}, added line leak.txt line 1)"
    ]


def test_a_merge_that_adds_the_value_itself_is_found(repo: tuple[Path, str]) -> None:
    path, base = repo
    git(path, "checkout", "-qb", "side")
    commit(path, {"side.txt": b"side\n"})
    git(path, "checkout", "-q", "-")
    commit(path, {"main.txt": b"main\n"})
    git(path, "merge", "-q", "--no-commit", "side")
    (path / "side.txt").write_text(f"side {VALUE}\n")
    git(path, "add", "-A")
    git(path, "commit", "-qm", "merge")
    merge = git(path, "rev-parse", "HEAD")
    assert f"secret DEPLOY_KEY (commit {merge[:12]}, added line side.txt line 1)" in scan(
        path, base
    )


def test_a_clean_change_and_refuse_secrets(repo: tuple[Path, str]) -> None:
    path, base = repo
    commit(path, {"app.py": b"x = 2\n" * 50})
    head = git(path, "rev-parse", "HEAD")
    assert refuse_secrets(SECRETS, path, base, head, run_id=3) == []
    commit(path, {"b.txt": base64.b64encode(VALUE.encode())})
    with pytest.raises(SecretInResult) as caught:
        refuse_secrets(SECRETS, path, base, "HEAD", run_id=3)
    message = str(caught.value)
    assert "secret DEPLOY_KEY, base64-encoded" in message and "b.txt line 1" in message
    assert "nothing was pushed" in message and "trimo runs show 3 --patch" in message
    assert VALUE not in message and base64.b64encode(VALUE.encode()).decode() not in message


def test_short_values_are_refused_with_the_reason() -> None:
    with pytest.raises(SecretTooShort) as caught:
        check_secret_value("PIN", "1234")
    assert "secret PIN is 4 characters long; Trimo needs at least 8" in str(caught.value)
    assert "1234" not in str(caught.value).replace("4 characters", "")
    check_secret_value("LONG_ENOUGH", "12345678")


def test_names_git_quotes_and_empty_files_are_scanned_unquoted(repo: tuple[Path, str]) -> None:
    path, base = repo
    quoted = 'odd"name\\with-quotes-9x'  # git quotes a name holding a quote or a backslash
    sha = commit(path, {f"dir/{quoted}.txt": b"", "empty-ok.txt": b""})
    found = [h.describe() for h in SecretScanner({"ODD": quoted}).scan_range(path, base, "HEAD")]
    assert found == [f"secret ODD (commit {sha[:12]}, file name dir/***.txt)"]


def test_a_file_offered_whole_is_scanned_everywhere() -> None:
    scanner = SecretScanner(SECRETS)
    patch = b"From 123\nSubject: x\n\n-" + VALUE.encode() + b"\n"
    assert [h.describe() for h in scanner.scan_file(patch, "run-7.patch")] == [
        "secret DEPLOY_KEY (file run-7.patch)"
    ]
    assert scanner.scan_file(b"nothing to see", "run-7.patch") == []
