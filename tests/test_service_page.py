"""The search page in a real browser: Debian's headless Chromium driven by Selenium.

The test chooses a clip through the page's file input, presses Identify and
reads the matches from the page, as a person would. It saves the screenshot
the README shows: to docs/search_page.png when that file is missing or
``MERT_UPDATE_SCREENSHOT=1`` (so that a test run does not rewrite a committed
file), and always beside the test's temporary files. Without Chromium and its
driver the test is skipped -- except in CI (``CI=true``), where scripts/test.sh
installs them, so their absence is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator

import pytest

from mert_indexer.service.server import ServiceThread
from tests.conftest import ROOT
from tests.test_service import build_index, excerpt, options, ready, request, wait_for

SCREENSHOT = ROOT / "docs" / "search_page.png"
MAX_SCREENSHOT_BYTES = 150_000
# As root, in a container, without a network: no sandbox, no GPU, nothing phoning home.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=860,600",
)


def _browser_parts() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    why = "needs Debian's chromium and chromium-driver (scripts/test.sh installs them)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI: {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser(tmp_path_factory, monkeypatch_module) -> Iterator[object]:
    browser_path, driver_path = _browser_parts()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("CI: selenium is missing (the dev extra)")
        pytest.skip("needs selenium (the dev extra)")
    monkeypatch_module.setenv("SE_OFFLINE", "true")  # Selenium Manager: never download
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser_path
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def page_service(triton, catalogue, tmp_path_factory) -> Iterator[ServiceThread]:
    index = tmp_path_factory.mktemp("page-index") / "idx"
    build_index(triton.grpc_url, catalogue[0].parent, index)
    with ServiceThread(options(index, triton.grpc_url)) as service:
        wait_for(lambda: ready(service.url))
        yield service


def test_page_needs_nothing_from_elsewhere(page_service):
    status, headers, html = request("GET", f"{page_service.url}/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert 'fetch("/v1/identify' in html or "/v1/identify" in html


def test_page_identifies_a_clip_chosen_in_the_browser(
    browser, page_service, catalogue, tmp_path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    which, start = 3, 2.0
    clip = excerpt(catalogue[which], start, 8.0, tmp_path / "excerpt.wav")
    driver.get(page_service.url + "/")
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: "tracks" in d.find_element(By.ID, "index-info").text)
    info = driver.find_element(By.ID, "index-info").text
    assert "6 tracks" in info and "mert-tiny" in info and "exact" in info

    driver.find_element(By.ID, "file").send_keys(str(clip))
    assert driver.find_element(By.ID, "chosen").text == "excerpt.wav"
    driver.find_element(By.ID, "rank").click()  # best guesses: the tiny model needs them
    driver.find_element(By.ID, "go").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results tr.match"))

    rows = driver.find_elements(By.CSS_SELECTOR, "#results tr.match")
    cells = [c.text for c in rows[0].find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "1" and cells[1] == str(catalogue[which])
    assert re.fullmatch(r"\d+:\d\d", cells[2])
    minutes, seconds = cells[2].split(":")
    assert abs(int(minutes) * 60 + int(seconds) - start) <= 5.0  # one index window
    assert 0.0 <= float(cells[3]) <= 1.0
    assert "excerpt.wav" in driver.find_element(By.ID, "status").text

    shot = tmp_path / "search_page.png"
    driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size < MAX_SCREENSHOT_BYTES
    if os.environ.get("MERT_UPDATE_SCREENSHOT") == "1" or not SCREENSHOT.exists():
        shutil.copy(shot, SCREENSHOT)


def test_page_shows_an_error_from_the_api(browser, page_service, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    bad = tmp_path / "not-audio.mp3"
    bad.write_bytes(os.urandom(20_000))
    driver.get(page_service.url + "/")
    driver.find_element(By.ID, "file").send_keys(str(bad))
    driver.find_element(By.ID, "go").click()
    status = driver.find_element(By.ID, "status")
    WebDriverWait(driver, 60).until(lambda d: "error" in status.get_attribute("class"))
    assert "not readable audio" in status.text and "not-audio.mp3" in status.text
    assert not driver.find_element(By.ID, "results").is_displayed()
