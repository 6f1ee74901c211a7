"""Fixtures for the playground tests: a tiny checkpoint that learns fast, `hope serve` processes,
and headless Chromium driven by Selenium.

The browser is Debian's `chromium` with its `chromedriver` (`.ci/run` installs both); nothing is
downloaded. Without them (or without the selenium package) the browser tests are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.server.support import ServerProcess, make_checkpoint

CHROMIUM = Path(os.environ.get("HOPE_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("HOPE_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))
# inner learning rates far above the bundled model's: one reading of a message measurably lowers
# the next reading's loss, even in a model whose slow weights are random
FAST_LEARNER = dict(lr_fast=1.0, lr_mid=1.0)  # a session that visibly learns


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install selenium)"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (path.is_file() and os.access(path, os.X_OK)):
            return f"{path} is missing (apt-get install {package})"
    return None


@pytest.fixture(scope="session")
def learner_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("fast-learner-checkpoint"), **FAST_LEARNER)


@pytest.fixture(scope="session")
def server(learner_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`hope serve` on a free loopback port, sessions in SQLite."""
    folder = tmp_path_factory.mktemp("playground-server")
    process = ServerProcess(learner_checkpoint, f"sqlite:///{folder}/sessions.db", folder / "server.log")
    yield process
    process.stop()


@pytest.fixture(scope="session")
def keyed_server(learner_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with API keys (HOPE_API_KEYS)."""
    folder = tmp_path_factory.mktemp("playground-keyed-server")
    process = ServerProcess(learner_checkpoint, "memory://", folder / "server.log",
                            HOPE_API_KEYS="acme:acme-key,globex:globex-key")
    yield process
    process.stop()


@pytest.fixture(scope="session")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="session")
def browser(downloads: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Headless Chromium, one for the run: every test opens its page afresh."""
    missing = browser_missing()
    if missing and os.environ.get("CI"):
        pytest.fail(f"CI must run the browser tests (.ci/run installs the browser): {missing}")
    if missing:
        pytest.skip(f"no headless browser: {missing}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,900", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-sync", "--force-device-scale-factor=1",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def open_page(browser) -> Callable[[str], object]:
    """`open_page(base_url)`: a fresh page (localStorage cleared) on that server."""
    opened: list[str] = []

    def open_(base_url: str):
        browser.get(f"{base_url}/")
        browser.execute_script("localStorage.clear()")
        browser.get(f"{base_url}/")
        opened.append(base_url)
        return browser

    yield open_
    if opened:
        browser.execute_script("localStorage.clear()")
