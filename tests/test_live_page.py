"""The live page in a real browser: headless Chromium (Debian's chromium and chromium-driver, driven by selenium)
opens / on a real gunicorn server that has a key, is given the key, fires the demo burst with its button, and
draws a row per request that gets its finish mark; a prompt sent twice is marked as a prefix-cache hit the second
time, and the page gives the share of prompt tokens that came from the cache; on a server of two engines it draws a
lane for each, and each lane shows the requests its engine served. .ci/run installs Chromium, so this runs in CI;
elsewhere it skips, saying what is missing.

What the tests read: engine 0's lane is section#lane-0 with the canvases #counts and #timeline and the line
#summary, as the page had before it had lanes; engine N's (N >= 1) has the same ids ending in -N. Each lane's
timeline canvas says what it drew in data-rows (requests in view), data-finished (of those, finished) and
data-cache-hits (of those, admitted with part of their prompt in the prefix cache)."""
import re
import shutil

import pytest

import requests
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
PROMPT = list(range(1000, 1040))  # 40 tokens: the second time, its first two blocks of 16 are in the prefix cache


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


@pytest.fixture(scope="module")
def two_engines(tiny_model_dir):
    with running_server("dynamic", tiny_model_dir, ENGINES="2") as url:
        yield url


def drawn(browser, name: str) -> int:
    return int(browser.find_element(By.ID, "timeline").get_attribute(f"data-{name}") or 0)


# What the page shows, read in one go (between two frames, so that it all agrees): the headline batch and prefix-cache
# share, and per lane what its timeline canvas drew, its title and its summary line.
SHOWN = """return {batch: Number(document.getElementById("batch").textContent),
                  cacheShare: document.getElementById("cache-share").textContent,
                  lanes: [...document.querySelectorAll("section.lane")].map((lane) => ({
                    id: lane.id,
                    rows: Number(lane.querySelector("canvas[id^=timeline]").dataset.rows ?? 0),
                    finished: Number(lane.querySelector("canvas[id^=timeline]").dataset.finished ?? 0),
                    title: lane.querySelector(".lane-title").textContent,
                    summary: lane.querySelector("p[id^=summary]").textContent}))};"""


def open_with_key(browser, url: str) -> None:
    browser.get(url + "/")
    wait_until(lambda: "API key" in browser.find_element(By.ID, "status").text)  # /timeline needs the key
    browser.find_element(By.ID, "key").send_keys(KEY)
    wait_until(lambda: browser.find_element(By.ID, "policy").text == "dynamic")


def lanes_shown(browser) -> list[dict]:
    return browser.execute_script(SHOWN)["lanes"]


def save_whole_page(browser, path) -> None:
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, height + 200)  # room for the window's frame: every lane in the picture
    assert browser.save_screenshot(str(path))


def test_a_burst_fired_from_the_page_shows_as_rows_that_finish(server, browser, tmp_path):
    open_with_key(browser, server)
    for field, value in (("burst-requests", BURST), ("burst-wait", 0.05)):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(str(value))
    browser.find_element(By.ID, "burst").click()
    wait_until(lambda: drawn(browser, "rows") >= BURST, timeout=120)
    wait_until(lambda: drawn(browser, "finished") >= BURST, timeout=120)
    assert f"sent {BURST} requests" in browser.find_element(By.ID, "status").text
    assert f"{drawn(browser, 'rows')} requests in view" in browser.find_element(By.ID, "summary").text
    assert not browser.find_element(By.CSS_SELECTOR, "#lane-0 .lane-title").is_displayed()  # one engine: no lanes
    assert browser.save_screenshot(str(tmp_path / "live.png"))


def test_a_prompt_found_in_the_prefix_cache_is_marked_and_its_share_shown(server, browser, tmp_path):
    open_with_key(browser, server)
    cached = []
    for _ in range(2):
        answer = requests.post(server + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4},
                               headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert answer.status_code == 200
        cached.append(answer.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached == [0, 32]
    wait_until(lambda: drawn(browser, "cache-hits") >= 1, timeout=60)
    shown = browser.execute_script(SHOWN)
    [lane] = shown["lanes"]
    assert "found part of their prompt in the prefix cache" in lane["summary"]
    # the lane's figures (its title, hidden with one engine) and the headline: a share of the window's prompt tokens
    lane_share = re.search(r" · cache (\d+\.\d%)$", lane["title"])
    assert lane_share and lane_share.group(1) == shown["cacheShare"] != "0.0%"
    assert browser.save_screenshot(str(tmp_path / "live_cache_hit.png"))


def test_two_engines_get_a_lane_each_that_shows_the_requests_it_served(two_engines, browser, tmp_path):
    browser.get(two_engines + "/")
    wait_until(lambda: len(lanes_shown(browser)) == 2, timeout=120)
    assert [browser.find_element(By.ID, f"{name}-1").tag_name for name in ("counts", "timeline", "summary")] == [
        "canvas", "canvas", "p"]
    assert requests.post(two_engines + "/demo-burst", json={"requests": BURST, "wait": 0.05},
                         timeout=60).status_code == 202

    def every_lane(condition) -> bool:
        return all(condition(lane) for lane in lanes_shown(browser))

    # the router sends each request to the engine with the least work outstanding: both get some
    wait_until(lambda: every_lane(lambda lane: lane["rows"] > 0)
               and sum(lane["rows"] for lane in lanes_shown(browser)) >= BURST, timeout=120)
    # a finished request leaves the view 30 s later: on a slow machine the first may go before the last finishes
    wait_until(lambda: every_lane(lambda lane: lane["finished"] > 0), timeout=120)
    shown = browser.execute_script(SHOWN)
    assert [lane["id"] for lane in shown["lanes"]] == ["lane-0", "lane-1"]
    for engine, lane in enumerate(shown["lanes"]):
        assert lane["title"].startswith(f"Engine {engine} ")
        assert lane["summary"].startswith(f"{lane['rows']} requests in view")
    assert shown["batch"] == sum(int(re.search(r"batch (\d+)", lane["title"]).group(1)) for lane in shown["lanes"])
    assert "2 engines" in browser.find_element(By.ID, "model").text
    save_whole_page(browser, tmp_path / "live_two_engines.png")
