"""The live page in a real browser: headless Chromium (Debian's chromium and chromium-driver, driven by selenium)
opens / on a real gunicorn server that has a key, is given the key, fires the demo burst with its button, and
draws a row per request that gets its finish mark. .ci/run installs Chromium, so this runs in CI; elsewhere it
skips, saying what is missing."""
import shutil

import pytest

from conftest import running_server, wait_until

webdriver = pytest.importorskip("selenium.webdriver",
                                reason="selenium is not installed: pip install -r requirements.txt")
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no Chromium here: apt-get install chromium "
                                                                        "chromium-driver (.ci/run does)")
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1280,1000")
KEY = "s3cret"
BURST = 12


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={tmp_path / 'profile'}",):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server("dynamic", tiny_model_dir, key=KEY) as url:
        yield url


def drawn(browser, name: str) -> int:
    return int(browser.find_element(By.ID, "timeline").get_attribute(f"data-{name}") or 0)


def test_a_burst_fired_from_the_page_shows_as_rows_that_finish(server, browser, tmp_path):
    browser.get(server + "/")
    wait_until(lambda: "API key" in browser.find_element(By.ID, "status").text)  # /timeline needs the key
    browser.find_element(By.ID, "key").send_keys(KEY)
    wait_until(lambda: browser.find_element(By.ID, "policy").text == "dynamic")
    for field, value in (("burst-requests", BURST), ("burst-wait", 0.05)):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(str(value))
    browser.find_element(By.ID, "burst").click()
    wait_until(lambda: drawn(browser, "rows") >= BURST)
    wait_until(lambda: drawn(browser, "finished") >= BURST)
    assert f"sent {BURST} requests" in browser.find_element(By.ID, "status").text
    assert f"{drawn(browser, 'rows')} requests in view" in browser.find_element(By.ID, "summary").text
    assert browser.save_screenshot(str(tmp_path / "live.png"))
