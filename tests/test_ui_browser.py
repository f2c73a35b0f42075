"""The run pages in a real browser: headless Chromium on `trimo ui`, a real run in a container."""

# ruff: noqa: F811  (the fixture is imported so pytest finds it; tests name it to get it)

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from bot.states import RunState
from bot.store import Store
from tests.browser import browser, page_text  # noqa: F401
from tests.containers import make_repo, trimo_free_env
from tests.tcp_proxy import CuttableProxy

pytestmark = pytest.mark.docker

TICKS = 60
AGENT = (
    f'for i in $(seq 1 {TICKS}); do echo "tick $i $(date +%s%3N)"; sleep 0.25; done; '
    "echo hello > hello.txt && git add hello.txt && git commit -qm 'Say hello'"
)
JUNIT = (
    '<testsuite name="t"><testcase classname="tests.test_api" name="test_login">'
    '<failure message="assert 401 == 200">login answered 401 OUTPUT-MARK-7</failure>'
    '</testcase><testcase classname="tests.test_api" name="test_ok"/></testsuite>'
)
CONFIG = f"""test:
  command: echo '{JUNIT}' > "$TRIMO_OUT/junit.xml"; exit 1
  junit: junit.xml
"""
# Records when each log line reaches the page (the browser's clock is the host's).
OBSERVE = """
window.seen = {};
new MutationObserver(function (ms) {
  ms.forEach(function (m) { m.addedNodes.forEach(function (n) {
    if (n.nodeType === 1 && n.classList.contains('line')) {
      window.seen[n.textContent.trim()] = Date.now();
    }
  }); });
}).observe(document.getElementById('log'), {childList: true});
"""
LINES = (
    "return Array.from(document.querySelectorAll('#log .line'))"
    ".map(e => e.textContent.replace(/\\n$/, ''));"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Local:
    def __init__(self, tmp: Path) -> None:
        self.data = tmp / "data"
        self.env = trimo_free_env(TRIMO_DATA_DIR=str(self.data))
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bot", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def store(self) -> Store:
        return Store(Store.sqlite_url(self.data))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


@pytest.fixture
def local(tmp_path: Path, base_image: str) -> Iterator[tuple[Local, CuttableProxy]]:
    """`trimo ui` on 127.0.0.1 for this data directory, behind a proxy that can drop it."""
    lo = Local(tmp_path)
    port = _free_port()
    lo.start("ui", "--port", str(port))
    try:
        _wait(lambda: _up(f"http://127.0.0.1:{port}/runs"), 30, "trimo ui to answer")
        with CuttableProxy(port) as proxy:
            yield lo, proxy
    finally:
        lo.stop()


def _up(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_a_live_run_page_streams_lines_within_a_second_and_a_cut_loses_and_doubles_none(
    tmp_path: Path, local: tuple[Local, CuttableProxy], browser: Any
) -> None:
    lo, proxy = local
    url = proxy.url
    repo = tmp_path / "repo"
    make_repo(repo, {"README.md": "# r\n", ".trimo/config.yml": CONFIG})
    run = lo.start("run", "--repo", str(repo), "--task", "Count", "--agent", AGENT)
    store = lo.store()
    run_id = _wait(lambda: [r.id for r in store.list_runs(limit=1)], 60, "the run")[0]
    _wait(lambda: store.get_run(run_id).state == RunState.AGENT, 120, "the agent to start")

    browser.get(f"{url}/runs/{run_id}")
    browser.execute_script(OBSERVE)
    # Enough lines seen arriving live (not in the page as first served) to judge their delay,
    # then a second more so each of them was printed well before the cut.
    _wait(
        lambda: (
            browser.execute_script(
                "return Object.keys(window.seen).filter(k => k.startsWith('tick ')).length;"
            )
            >= 6
        ),
        30,
        "six ticks arriving on the open page",
    )
    time.sleep(1.1)
    proxy_cut_ms = time.time() * 1000
    # The connection drops (the proxy plays the network), for longer than the retry delay.
    proxy.cut()
    time.sleep(1.5)
    proxy.restore()

    assert run.wait(timeout=120) == 1  # the tests fail, as configured
    final_lines = [e.message for e in store.events(run_id, kinds=["log"])]
    _wait(lambda: browser.execute_script(LINES) == final_lines, 10, "every line on the page")
    shown = browser.execute_script(LINES)
    # No line lost, none shown twice, in the order the container printed them.
    assert shown == final_lines
    ticks = [line for line in shown if line.startswith("tick ")]
    assert [int(t.split()[1]) for t in ticks] == list(range(1, TICKS + 1))

    # Each line printed while connected reached the page within a second, without a reload.
    seen: dict[str, int] = browser.execute_script("return window.seen;")
    delays = []
    for line in ticks:
        printed = int(line.split()[2])
        if line in seen and printed < proxy_cut_ms - 1000:
            delays.append(seen[line] - printed)
    assert len(delays) >= 5, (delays, seen)
    assert max(delays) < 1000, delays

    # After the run: the failing test's name, message and output; the commit with its diff.
    browser.get(f"{url}/runs/{run_id}")
    text = page_text(browser)
    assert "test_login" in text and "assert 401 == 200" in text and "OUTPUT-MARK-7" in text
    assert "Say hello" in text and "+hello" in text
    _screenshots(browser, url, run_id)


def _screenshots(browser: Any, url: str, run_id: int) -> None:
    """Saved where TRIMO_UI_SCREENSHOTS points (the docs/ pictures are made this way)."""
    where = os.environ.get("TRIMO_UI_SCREENSHOTS")
    if not where:
        return
    Path(where).mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(Path(where) / "ui-run.png"))
    browser.get(f"{url}/runs")
    browser.save_screenshot(str(Path(where) / "ui-runs.png"))
