"""Headless Chromium (Debian's `chromium` and `chromium-driver`) driven by Selenium."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-quic",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)


@pytest.fixture
def browser() -> Iterator[object]:
    """A fresh Chromium with its own profile; skipped where Debian's chromium is missing
    (scripts/setup installs it)."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("chromium and chromium-driver are not installed (scripts/setup does it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="trimo-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# The page's text read in one script: an element found in one document and read after a click
# or redirect replaced it fails ("stale element", or Chromium's "Node with given id does not
# belong to the document"); a script runs in whichever document is there and sees it whole.
_TEXT = (
    "return document.readyState === 'complete' && document.body ? document.body.innerText : null"
)


def page_text(driver: Any, until: Callable[[str], bool] = bool, timeout: float = 15) -> str:
    """The text of the page once it has loaded and `until(text)` holds (a click returns before
    the browser lands on the page its form posts to); the page's text in the failure if not."""
    from selenium.common.exceptions import JavascriptException, TimeoutException
    from selenium.webdriver.support.wait import WebDriverWait

    seen = ""

    def ready(d: Any) -> bool:
        nonlocal seen
        text = d.execute_script(_TEXT)
        if text is None:
            return False
        seen = str(text)
        return until(seen)

    try:
        WebDriverWait(
            driver, timeout, poll_frequency=0.1, ignored_exceptions=[JavascriptException]
        ).until(ready)
    except TimeoutException:
        raise AssertionError(
            f"{driver.current_url} did not show what was waited for in {timeout:.0f} s; "
            f"it shows: {seen[:1000]!r}"
        ) from None
    return seen
