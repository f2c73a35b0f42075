"""The secret scan: nothing Trimo publishes carries a value it handed to a run.

Before any push Trimo looks at what it is about to publish (every commit of `base..head`): the
raw commit objects (message, author, committer), every file name a commit adds or changes, and
every added line of every commit's patch, binary files included, as bytes. It looks for each value
given to the run (granted secrets, per-run tokens: one mapping name → value), plain and in the
encodings that carry a value through a file unchanged: base64 (standard and URL-safe, in each of
the three alignments a value can start at), URL-encoding and hex (lower and upper case).

A hit names the secret by its name and says where (commit, path, line, encoding), never the
value. Two git commands give everything (`git log -p` of the range, `git cat-file` of its
commits); the scan is one C-speed substring search per encoded value over their output, and only
output where some value occurs is parsed, line by line, to say where.

    scanner = SecretScanner({"API_TOKEN": "..."})
    hits = scanner.scan_range(repo, base, head)        # -> list[SecretHit]
    refuse_secrets(scanner, repo, base, head)          # raises SecretInResult on a hit
    scanner.scan_file(patch_bytes, "run-7.patch")      # a file offered whole (fork patch)
"""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, quote_plus

from bot.errors import PublishRefused, SettingsError

# Shorter values match ordinary text (a word, a number) everywhere, and a scan that refuses every
# run protects nothing: such secrets are refused where they are configured.
MIN_SECRET_LENGTH = 8
GIT_TIMEOUT_SECONDS = 300
MAX_HITS_SHOWN = 10

SECRET_TOO_SHORT = (
    "secret {name} is {length} characters long; Trimo needs at least {minimum}: before it "
    "publishes a run's commits it scans them for every secret value the run was given, and a "
    "value this short would match ordinary text in almost any change. Use a longer value"
)
SECRET_IN_RESULT = (
    "the result holds the value of {what}; nothing was pushed. "
    "The commits stay with the run: `trimo runs show {run_id} --patch` prints them"
)
GIT_FAILED = "git {command} failed while scanning the result for secrets (exit {code}): {stderr}"

# `git log` starts every commit's part of its output with this line: a NUL cannot begin a line of
# a patch (each line there starts with a diff marker), so a commit's content cannot fake it.
_COMMIT_MARK = b"\0"
_HUNK = re.compile(rb"^@@ -\d+(?:,\d+)? \+(\d+)(?:,\d+)? @@")
_SHA = re.compile(rb"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")
_COMMIT_LINE = re.compile(rb"^\0([0-9a-f]{40}(?:[0-9a-f]{24})?)$", re.MULTILINE)


@dataclass(frozen=True)
class SecretHit:
    """Where a secret's value was found; never the value itself."""

    secret: str  # the secret's name
    encoding: str  # "plain", "base64" (standard or URL-safe), "url", "hex"
    commit: str
    where: str  # "added line", "file name", "commit message", "file" (scan_file)
    path: str | None = None
    line: int | None = None

    def describe(self) -> str:
        encoded = "" if self.encoding == "plain" else f", {self.encoding}-encoded"
        where = self.where if self.path is None else f"{self.where} {self.path}"
        if self.line is not None:
            where += f" line {self.line}"
        place = f"commit {self.commit[:12]}, {where}" if self.commit else where
        return f"secret {self.secret}{encoded} ({place})"


class SecretInResult(PublishRefused):
    """The result carries a secret's value: it is not published. `hits` say where."""

    def __init__(self, run_id: int, hits: list[SecretHit]) -> None:
        self.hits = hits
        shown = "; ".join(h.describe() for h in hits[:MAX_HITS_SHOWN])
        if len(hits) > MAX_HITS_SHOWN:
            shown += f"; and {len(hits) - MAX_HITS_SHOWN} more"
        super().__init__(SECRET_IN_RESULT.format(what=shown, run_id=run_id))


class SecretTooShort(SettingsError):
    """A secret's value is too short to be recognised in what a run publishes."""


def check_secret_value(name: str, value: str) -> None:
    """Refuse a secret whose value is too short to scan for (call it where values are set)."""
    if len(value) < MIN_SECRET_LENGTH:
        raise SecretTooShort(
            SECRET_TOO_SHORT.format(name=name, length=len(value), minimum=MIN_SECRET_LENGTH)
        )


def encodings(value: bytes) -> dict[bytes, str]:
    """The forms of `value` the scan looks for (variant → encoding name), each variant once."""
    found: dict[bytes, str] = {value: "plain"}

    def add(name: str, variant: bytes) -> None:
        if len(variant) >= MIN_SECRET_LENGTH:
            found.setdefault(variant, name)

    for offset in range(3):
        # After `offset` bytes of other data, these characters depend on the value's bytes only.
        start = -(-8 * offset // 6)
        end = (8 * offset + 8 * len(value)) // 6
        padded = b"\0" * offset + value
        add("base64", base64.b64encode(padded)[start:end])
        add("base64", base64.urlsafe_b64encode(padded)[start:end])
    for quoted in (quote(value, safe=""), quote_plus(value, safe="")):
        add("url", quoted.encode())
        # Percent-escapes in lower case (%2f) are as valid as upper case.
        add("url", re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quoted).encode())
    add("hex", value.hex().encode())
    add("hex", value.hex().upper().encode())
    return found


class SecretScanner:
    """Finds the values of `secrets` (name → value) in bytes, in every encoding of `encodings`.

    Values shorter than MIN_SECRET_LENGTH are not looked for (configuration refuses them for
    granted secrets; see check_secret_value).
    """

    def __init__(self, secrets: Mapping[str, str]) -> None:
        self._variants: dict[bytes, tuple[str, str]] = {}
        for name, value in sorted(secrets.items()):
            if len(value) < MIN_SECRET_LENGTH:
                continue
            for variant, kind in encodings(value.encode("utf-8", "surrogateescape")).items():
                self._variants.setdefault(variant, (name, kind))
        # Longest first: where two variants overlap, the fuller one names the hit.
        ordered = sorted(self._variants, key=len, reverse=True)
        self._pattern = re.compile(b"|".join(re.escape(v) for v in ordered)) if ordered else None

    @property
    def empty(self) -> bool:
        return self._pattern is None

    def present(self, data: bytes) -> bool:
        """Whether any value occurs in `data`: one C-speed search per variant, no parsing."""
        return any(variant in data for variant in self._variants)

    def redact(self, data: bytes) -> str:
        """`data` as text with every value replaced by `***`: a path may hold one itself."""
        if self._pattern is not None and self.present(data):
            data = self._pattern.sub(b"***", data)
        return data.decode(errors="replace")

    def find(self, data: bytes) -> list[tuple[str, str]]:
        """(secret name, encoding) of every value in `data`, each pair once, in order of offset."""
        if self._pattern is None or not self.present(data):
            return []
        seen: dict[tuple[str, str], None] = {}
        for match in self._pattern.finditer(data):
            seen.setdefault(self._variants[match.group(0)], None)
        return list(seen)

    # -- what a run publishes ------------------------------------------------------------------

    def scan_range(self, repo: Path, base: str, head: str) -> list[SecretHit]:
        """Every hit in the commits `base..head` of the git repository `repo` (a bare mirror)."""
        if self._pattern is None:
            return []
        log = _git(repo, *_LOG_PATCH, f"{base}..{head}")
        commits = _COMMIT_LINE.findall(log)
        if not commits:
            return []
        return self._scan_commits(repo, commits) + self._scan_log(log)

    def scan_file(self, data: bytes, name: str) -> list[SecretHit]:
        """Hits anywhere in a file Trimo offers whole (a patch for a fork, a download)."""
        return [SecretHit(secret, kind, "", "file", name) for secret, kind in self.find(data)]

    def _scan_commits(self, repo: Path, revs: list[bytes]) -> list[SecretHit]:
        # The raw objects: message, author and committer, as git will send them.
        raw = _git(repo, "cat-file", "--batch", stdin=b"\n".join(revs) + b"\n")
        if not self.present(raw):
            return []
        hits = []
        pos = 0
        while pos < len(raw):
            header_end = raw.index(b"\n", pos)
            sha, _, size = raw[pos:header_end].split(b" ")
            body = raw[header_end + 1 : header_end + 1 + int(size)]
            pos = header_end + 1 + int(size) + 1
            for name, kind in self.find(body):
                hits.append(SecretHit(name, kind, sha.decode(), "commit message"))
        return hits

    def _scan_log(self, log: bytes) -> list[SecretHit]:
        """Hits in the file names and added lines of `git log -p` output (see _LOG_PATCH)."""
        # A name git quoted holds its value escaped: such output is read line by line anyway.
        if not self.present(log) and b'diff --git "' not in log:
            return []
        hits: list[SecretHit] = []
        commit = ""
        path = "?"
        line = 0
        lines = log.split(b"\n")
        for index, text in enumerate(lines):
            if text.startswith(b"+"):
                if not text.startswith(b"+++ "):
                    for name, kind in self.find(text[1:]):
                        hits.append(SecretHit(name, kind, commit, "added line", path, line))
                    line += 1
            elif text.startswith(b"@@ "):
                hunk = _HUNK.match(text)
                line = int(hunk.group(1)) if hunk else 0
            elif text.startswith(b"diff --git "):
                raw = _diff_path(text[len(b"diff --git ") :])
                path = self.redact(raw)
                following = lines[index + 1] if index + 1 < len(lines) else b""
                if not following.startswith(b"deleted file mode"):
                    for name, kind in self.find(raw):
                        hits.append(SecretHit(name, kind, commit, "file name", path))
            elif text.startswith(_COMMIT_MARK) and _SHA.match(text[1:]):
                commit, path = text[1:].decode(), "?"
            elif text.startswith(b" "):
                line += 1
        return hits


_LOG_PATCH = (
    "-c",
    "core.quotePath=false",
    "log",
    "--format=%x00%H",
    "-p",
    # Binary files as bytes, like text: a value inside one is found as well.
    "--text",
    "--unified=0",
    "--no-renames",
    "--no-color",
    "--no-ext-diff",
    "--no-textconv",
    "--src-prefix=a/",
    "--dst-prefix=b/",
    # A merge's own changes (an "evil merge") count too: its diff against the first parent.
    "--diff-merges=first-parent",
)


def _diff_path(rest: bytes) -> bytes:
    """The file name of a `diff --git a/NAME b/NAME` line (the same name twice: no renames)."""
    if rest.startswith(b'"'):
        # Quoted by git for a quote, a backslash or a control character in the name.
        end = 1
        while end < len(rest) and rest[end] != ord('"'):
            end += 2 if rest[end] == ord("\\") else 1
        return _unquote(rest[1:end]).removeprefix(b"a/")
    return rest[2 : 2 + (len(rest) - 5) // 2]


_ESCAPES = {b"a": 7, b"b": 8, b"t": 9, b"n": 10, b"v": 11, b"f": 12, b"r": 13}
_ESCAPED = re.compile(rb"\\([0-7]{3}|.)", re.DOTALL)


def _unquote(quoted: bytes) -> bytes:
    def one(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        if len(code) == 3:
            return bytes([int(code, 8)])
        return bytes([_ESCAPES[code]]) if code in _ESCAPES else code

    return _ESCAPED.sub(one, quoted)


def _git(repo: Path, *args: str, stdin: bytes | None = None) -> bytes:
    # Prefixed `-c` options must come before the command; the others after `git`.
    done = subprocess.run(
        ["git", "-C", str(repo), *args],
        input=stdin,
        capture_output=True,
        timeout=GIT_TIMEOUT_SECONDS,
        check=False,
    )
    if done.returncode != 0:
        command = next((a for a in args if not a.startswith("-") and "=" not in a), "?")
        raise PublishRefused(
            GIT_FAILED.format(
                command=command,
                code=done.returncode,
                stderr=done.stderr.decode(errors="replace").strip()[-500:],
            )
        )
    return done.stdout


def refuse_secrets(
    secrets: Mapping[str, str], repo: Path, base: str, head: str, run_id: int
) -> list[SecretHit]:
    """The one call before any publication of `base..head` from `repo` (a branch push, a fork
    branch, a checkpoint, a patch built from it): raises SecretInResult when it carries a value
    of `secrets`; returns the (empty) hits otherwise."""
    hits = SecretScanner(secrets).scan_range(repo, base, head)
    if hits:
        raise SecretInResult(run_id, _unique(hits))
    return hits


def _unique(hits: Iterable[SecretHit]) -> list[SecretHit]:
    return list(dict.fromkeys(hits))
