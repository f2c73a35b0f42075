"""JUnit XML from real pytest runs and from Go and Jest reporters → totals and failure locations."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bot.junit import MAX_OUTPUT_CHARS, TestReport, parse_junit, parse_junit_bytes

FAILING_SUITE = textwrap.dedent(
    """
    import pytest

    def check_total(value):
        assert value == 4, "the cart total is wrong"

    def test_passes():
        assert True

    def test_total():
        check_total(3)

    def test_needs_db(database):
        pass

    @pytest.mark.skip(reason="flaky on CI")
    def test_skipped():
        pass

    def test_raises():
        raise RuntimeError("payment service unreachable")
    """
)

# go test -v ./... 2>&1 | go-junit-report
GO_JUNIT = b"""<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="4" failures="1" errors="0" skipped="1">
\t<testsuite name="example.com/shop/cart" tests="4" failures="1" errors="0" id="0" hostname="ci"
\t\tskipped="1" time="0.012" timestamp="2024-05-02T10:00:00Z">
\t\t<properties>
\t\t\t<property name="go.version" value="go1.22.2 linux/amd64"></property>
\t\t</properties>
\t\t<testcase name="TestAdd" classname="example.com/shop/cart" time="0.000"></testcase>
\t\t<testcase name="TestTotal" classname="example.com/shop/cart" time="0.001">
\t\t\t<failure message="Failed"><![CDATA[    cart_test.go:27: total = 3, want 4
    cart_test.go:28: see the discount rules]]></failure>
\t\t</testcase>
\t\t<testcase name="TestTotal/empty" classname="example.com/shop/cart" time="0.000"></testcase>
\t\t<testcase name="TestSlow" classname="example.com/shop/cart" time="0.000">
\t\t\t<skipped message="Skipped"><![CDATA[    cart_test.go:40: slow test]]></skipped>
\t\t</testcase>
\t</testsuite>
</testsuites>
"""

# jest --ci --reporters=default --reporters=jest-junit (addFileAttribute on for the first suite)
JEST_JUNIT = b"""<?xml version="1.0" encoding="UTF-8"?>
<testsuites name="jest tests" tests="3" failures="1" errors="0" time="1.204">
  <testsuite name="sum" errors="0" failures="1" skipped="0" timestamp="2024-05-02T10:00:00"
      time="0.41" tests="2">
    <testcase classname="sum adds 1 + 2 to equal 3" name="sum adds 1 + 2 to equal 3"
        time="0.002" file="/workspace/src/sum.test.js">
    </testcase>
    <testcase classname="sum adds 2 + 2 to equal 4" name="sum adds 2 + 2 to equal 4"
        time="0.003" file="/workspace/src/sum.test.js">
      <failure>Error: expect(received).toBe(expected) // Object.is equality

Expected: 4
Received: 5
    at Object.toBe (/workspace/src/sum.test.js:9:20)
    at Promise.then.completed (/workspace/node_modules/jest-circus/build/utils.js:298:28)
    at new Promise (&lt;anonymous&gt;)</failure>
    </testcase>
  </testsuite>
  <testsuite name="api" errors="0" failures="0" skipped="0" timestamp="2024-05-02T10:00:01"
      time="0.79" tests="1">
    <testcase classname="api responds" name="api responds" time="0.5">
    </testcase>
  </testsuite>
</testsuites>
"""

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<testsuite tests="1"><testcase name="&lol4;"/></testsuite>
"""


def _pytest_junit(tmp_path: Path, family: str) -> Path:
    project = tmp_path / family
    (project / "tests").mkdir(parents=True)
    (project / "tests" / "test_cart.py").write_text(FAILING_SUITE)
    out = project / "junit.xml"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "tests",
            f"--junitxml={out}",
            "-o",
            f"junit_family={family}",
        ],
        cwd=project,
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert out.is_file()
    return out


@pytest.mark.parametrize("family", ["xunit1", "xunit2"])
def test_a_real_pytest_report(tmp_path: Path, family: str) -> None:
    report = parse_junit([_pytest_junit(tmp_path, family)])
    assert report is not None
    assert (report.passed, report.failed, report.skipped, report.errors, report.total) == (
        1,
        2,
        1,
        1,
        5,
    )
    assert not report.ok
    by_name = {f.name: f for f in report.failures}
    assert set(by_name) == {"test_total", "test_needs_db", "test_raises"}

    total = by_name["test_total"]
    assert total.kind == "failure" and total.classname == "tests.test_cart"
    assert "the cart total is wrong" in total.message
    # The line in the test that failed, not the helper's line or the def line.
    assert (total.file, total.line) == ("tests/test_cart.py", 11)
    assert "assert 3 == 4" in total.output

    raises = by_name["test_raises"]
    assert (raises.file, raises.line) == ("tests/test_cart.py", 21)
    assert "payment service unreachable" in raises.message

    setup = by_name["test_needs_db"]
    assert setup.kind == "error" and "fixture 'database' not found" in setup.output
    assert setup.line == 13
    assert setup.file is not None and setup.file.endswith("tests/test_cart.py")


def test_a_go_junit_report_file() -> None:
    report = parse_junit_bytes(GO_JUNIT)
    assert (report.passed, report.failed, report.skipped, report.errors, report.total) == (
        2,
        1,
        1,
        0,
        4,
    )
    (failure,) = report.failures
    assert failure.title == "example.com/shop/cart.TestTotal"
    assert failure.message == "Failed"
    assert (failure.file, failure.line) == ("cart_test.go", 27)


def test_a_jest_junit_file() -> None:
    report = parse_junit_bytes(JEST_JUNIT)
    assert (report.passed, report.failed, report.total) == (2, 1, 3)
    (failure,) = report.failures
    assert failure.message == "Error: expect(received).toBe(expected) // Object.is equality"
    # The test file's frame, made relative to the checkout; jest's own frames are skipped.
    assert (failure.file, failure.line) == ("src/sum.test.js", 9)


def test_several_files_are_summed_and_broken_ones_skipped(tmp_path: Path) -> None:
    (tmp_path / "go.xml").write_bytes(GO_JUNIT)
    (tmp_path / "jest.xml").write_bytes(JEST_JUNIT)
    (tmp_path / "half.xml").write_bytes(JEST_JUNIT[:200])
    (tmp_path / "other.xml").write_bytes(b"<coverage line-rate='0.9'/>")
    report = parse_junit([*sorted(tmp_path.glob("*.xml")), tmp_path / "missing.xml"])
    assert report is not None
    assert (report.passed, report.failed, report.skipped, report.total) == (4, 2, 1, 7)
    assert [f.file for f in report.failures] == ["cart_test.go", "src/sum.test.js"]


def test_no_report_when_there_is_nothing_to_read(tmp_path: Path) -> None:
    assert parse_junit([]) is None
    (tmp_path / "x.xml").write_text("not xml at all")
    assert parse_junit([tmp_path / "x.xml", tmp_path / "absent.xml"]) is None


def test_entity_expansion_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a JUnit XML file"):
        parse_junit_bytes(BILLION_LAUGHS)
    (tmp_path / "bomb.xml").write_bytes(BILLION_LAUGHS)
    assert parse_junit([tmp_path / "bomb.xml"]) is None


def test_suites_with_counts_only() -> None:
    report = parse_junit_bytes(
        b'<testsuites tests="9"><testsuite name="a" tests="5" failures="1" errors="1" '
        b'skipped="1"/><testsuite name="b" tests="4" failures="0"/></testsuites>'
    )
    assert (report.passed, report.failed, report.errors, report.skipped, report.total) == (
        6,
        1,
        1,
        1,
        9,
    )


def test_long_output_keeps_its_end_and_the_report_round_trips() -> None:
    body = "x" * 10_000 + "\ntests/test_big.py:7: AssertionError"
    data = (
        '<testsuite tests="1"><testcase classname="t" name="big"><failure message="boom">'
        f"{body}</failure></testcase></testsuite>"
    ).encode()
    report = parse_junit_bytes(data)
    (failure,) = report.failures
    assert len(failure.output) <= MAX_OUTPUT_CHARS
    assert failure.output.endswith("tests/test_big.py:7: AssertionError")
    assert (failure.file, failure.line) == ("tests/test_big.py", 7)
    assert TestReport.from_dict(report.to_dict()) == report
