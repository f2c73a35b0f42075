"""JUnit XML reports (pytest, go-junit-report, jest-junit, ...) → test totals and failures.

junitparser reads the JUnit structure; the XML itself is parsed by defusedxml, which refuses
entity definitions (billion laughs) and external entities, and the tree is handed to junitparser
(which would otherwise parse with the standard library or lxml, neither of them safe here).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring
from junitparser import Attr, Error, Failure, JUnitXml, Skipped, TestCase, TestSuite

from bot.protocol import WORKSPACE

MAX_FILE_BYTES = 50 * 1024**2
MAX_OUTPUT_CHARS = 4000
MAX_MESSAGE_CHARS = 500
# Counts stay exact beyond this; only the details of further failures are dropped.
MAX_FAILURES = 200
TRUNCATED = "… (truncated)\n"

# Where a failure happened, as test tools print it: `path/x.py:42: AssertionError` (pytest),
# `x_test.go:12: got 3` (go), `at Object.<anonymous> (/app/x.test.js:4:17)` (jest),
# `File "x.py", line 42` (Python tracebacks), `file x.py, line 42` (pytest setup errors).
_LOCATIONS = (
    re.compile(r"""File "(?P<path>[^"]+)", line (?P<line>\d+)"""),
    re.compile(r"file (?P<path>\S+), line (?P<line>\d+)"),
    re.compile(
        r"(?:^|[\s(])(?P<path>[\w.@+\-/\\]*\w\.\w+):(?P<line>\d+)(?::\d+)?(?=[:)\s]|$)",
        re.MULTILINE,
    ),
)
_LIBRARY = (
    "site-packages/",
    "dist-packages/",
    "node_modules/",
    "/usr/lib/",
    "/usr/local/lib/",
    "<frozen",
    "internal/",
    "/go/src/",
    "/usr/local/go/",
)


@dataclass(frozen=True)
class TestFailure:
    """One failed or errored test case, with where it failed when the report tells."""

    __test__ = False  # not a pytest test class, despite the name

    name: str
    classname: str
    message: str
    kind: str  # "failure" or "error"
    file: str | None
    line: int | None
    output: str

    @property
    def title(self) -> str:
        return f"{self.classname}.{self.name}" if self.classname else self.name


@dataclass(frozen=True)
class TestReport:
    """Totals over all parsed files; `failures` holds at most MAX_FAILURES details."""

    __test__ = False

    passed: int = 0
    failed: int = 0
    skipped: int = 0
    errors: int = 0
    total: int = 0
    failures: list[TestFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.errors == 0

    def merge(self, other: TestReport) -> TestReport:
        return TestReport(
            passed=self.passed + other.passed,
            failed=self.failed + other.failed,
            skipped=self.skipped + other.skipped,
            errors=self.errors + other.errors,
            total=self.total + other.total,
            failures=[*self.failures, *other.failures][:MAX_FAILURES],
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TestReport:
        return cls(
            passed=int(data.get("passed", 0)),
            failed=int(data.get("failed", 0)),
            skipped=int(data.get("skipped", 0)),
            errors=int(data.get("errors", 0)),
            total=int(data.get("total", 0)),
            failures=[TestFailure(**f) for f in data.get("failures", [])],
        )


def parse_junit(paths: Iterable[Path]) -> TestReport | None:
    """One report over every readable JUnit file; None when there is none (or none parses)."""
    report: TestReport | None = None
    for path in paths:
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            part = parse_junit_bytes(path.read_bytes())
        except (OSError, ValueError):
            # A half-written or foreign XML file must not hide the results of the others.
            continue
        report = part if report is None else report.merge(part)
    return report


class _Case(TestCase):  # type: ignore[misc]
    """A <testcase> with the `file` and `line` pytest and others write."""

    file = Attr()
    line = Attr()


class _Suite(TestSuite):  # type: ignore[misc]
    """A <testsuite> whose counts are read as written: junitparser recounts a missing one from
    the cases (none, in a file of counts only) and writes the recount over the others."""

    testcase = _Case
    tests = Attr()
    failures = Attr()
    errors = Attr()
    skipped = Attr()


class _Report(JUnitXml):  # type: ignore[misc]
    testsuite = _Suite


def parse_junit_bytes(data: bytes) -> TestReport:
    """Parse one JUnit XML document; ValueError when it is not XML or not JUnit."""
    try:
        root = fromstring(data, forbid_dtd=True)
    except (ParseError, DefusedXmlException) as exc:
        raise ValueError(f"not a JUnit XML file: {exc}") from None
    if root.tag not in ("testsuites", "testsuite"):
        raise ValueError(f"not a JUnit XML file: root element is <{root.tag}>")
    # pytest writes `line` 0-based (the def line); other tools write it 1-based.
    zero_based = root.get("name") in ("pytest tests", "pytest")
    report = _Report.fromroot(root)
    cases: list[_Case] = [case for suite in report for case in suite]
    if not cases:
        return _suite_totals(report)
    passed = failed = skipped = errors = 0
    failures: list[TestFailure] = []
    for case in cases:
        results: list[Any] = case.result
        problem = next((r for r in results if isinstance(r, Failure)), None)
        kind = "failure"
        if problem is None:
            problem, kind = next((r for r in results if isinstance(r, Error)), None), "error"
        if problem is None:
            if any(isinstance(r, Skipped) for r in results):
                skipped += 1
            else:
                passed += 1
            continue
        if kind == "failure":
            failed += 1
        else:
            errors += 1
        if len(failures) < MAX_FAILURES:
            failures.append(_failure(case, problem, kind, zero_based))
    return TestReport(
        passed=passed,
        failed=failed,
        skipped=skipped,
        errors=errors,
        total=len(cases),
        failures=failures,
    )


def _leaf_suites(suites: Iterable[_Suite]) -> Iterator[_Suite]:
    for suite in suites:
        inner = list(suite.testsuites())
        if inner:
            yield from _leaf_suites(inner)
        else:
            yield suite


def _suite_totals(report: _Report) -> TestReport:
    # Some tools write only counts; leaf suites hold them (a root <testsuites> repeats the sums).
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in _leaf_suites(report):
        for name in counts:
            counts[name] += _int(getattr(suite, name)) or 0
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return TestReport(
        passed=max(passed, 0),
        failed=counts["failures"],
        skipped=counts["skipped"],
        errors=counts["errors"],
        total=counts["tests"],
    )


def _failure(case: _Case, problem: Failure | Error, kind: str, zero_based: bool) -> TestFailure:
    text = (problem.text or "").strip()
    message = (problem.message or "").strip() or next(
        (line.strip() for line in text.splitlines() if line.strip()), ""
    )
    declared = _relative(case.file)
    file, line = _location(text, declared)
    if file is None and declared is not None:
        file = declared
    if line is None and file == declared and (declared_line := _int(case.line)) is not None:
        line = declared_line + 1 if zero_based else declared_line
    return TestFailure(
        name=case.name or "",
        classname=case.classname or "",
        message=_truncate_head(message, MAX_MESSAGE_CHARS),
        kind=kind,
        file=file,
        line=line,
        output=_truncate_tail(text, MAX_OUTPUT_CHARS),
    )


def _location(text: str, declared: str | None) -> tuple[str | None, int | None]:
    """The first place in the test's own code that the failure text points at."""
    found: list[tuple[int, str, int]] = []
    for pattern in _LOCATIONS:
        for match in pattern.finditer(text):
            path = match["path"]
            if any(marker in path for marker in _LIBRARY):
                continue
            found.append((match.start(), path, int(match["line"])))
    found.sort()
    if declared is not None:
        for _, path, line in found:
            rel = _relative(path) or path
            if rel == declared or rel.endswith("/" + declared) or declared.endswith("/" + rel):
                return declared, line
        return None, None
    if found:
        _, path, line = found[0]
        return _relative(path), line
    return None, None


def _relative(path: str | None) -> str | None:
    if not path:
        return None
    path = path.replace("\\", "/")
    return path.removeprefix(WORKSPACE + "/").removeprefix("./")


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _truncate_head(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _truncate_tail(text: str, limit: int) -> str:
    # The end of a traceback (the assertion and its location) matters most.
    return text if len(text) <= limit else TRUNCATED + text[-(limit - len(TRUNCATED)) :]
