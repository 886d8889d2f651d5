"""The web chat page driven in headless Chromium (Selenium): type a message, watch a streamed reply appear.

Uses a locally installed browser and driver only (Debian: `apt-get install -y chromium chromium-driver`);
nothing is downloaded at run time. Skipped, saying why, only where no Chromium/driver is installed.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import fastapi  # noqa: F401 - dev dependencies; only a missing browser skips this test
import pytest
import selenium  # noqa: F401
from helpers import running, tiny_chat_checkpoint  # noqa: E402, I001

FIXTURE_TOKENIZER = Path(__file__).parent / "data" / "tokenizer"
KEY = "sk-browser"


def _find(*names: str) -> str | None:
    for n in names:
        path = shutil.which(n)
        if path:
            return path
    return None


BROWSER = os.environ.get("CHROME_BIN") or _find("chromium", "chromium-browser", "google-chrome", "chrome")
DRIVER = os.environ.get("CHROMEDRIVER") or _find("chromedriver")
if not (BROWSER and DRIVER):
    pytest.skip("no headless browser: install Chromium and its driver (Debian: apt-get install -y chromium "
                "chromium-driver) or set CHROME_BIN and CHROMEDRIVER", allow_module_level=True)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from tianying.api import LLM
    from tianying.serve.app import create_app

    out = tiny_chat_checkpoint(tmp_path_factory.mktemp("ckpt") / "browser-tiny", template="aquila-v1", context=512)
    llm = LLM.load(out)
    real_forward = llm.model.forward

    def slow_forward(*a, **kw):  # slow enough to watch the reply grow and to click Stop mid-reply
        time.sleep(0.03)
        return real_forward(*a, **kw)

    llm.model.forward = slow_forward
    with running(create_app(llm, api_key=KEY)) as u:
        yield u


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager reach the network
    opts = webdriver.ChromeOptions()
    opts.binary_location = BROWSER
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    yield d
    d.quit()


def _wait(cond, timeout=20.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _replies(driver):
    return [e.text for e in driver.find_elements("css selector", ".msg.assistant .content")]


def _send(driver, text):
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("id", "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def test_chat_page_streams_a_reply(url, driver):
    driver.get(url + "/")
    assert driver.title.startswith("天鹰")
    # without the key the page shows the server's 401 message instead of failing silently
    _send(driver, "你好")
    err = _wait(lambda: driver.find_element("id", "error").text, what="the error box")
    assert "401" in err and "API key" in err
    driver.find_element("id", "apikey").send_keys(KEY)
    driver.find_element("id", "temperature").clear()
    driver.find_element("id", "temperature").send_keys("0")
    driver.find_element("id", "max_tokens").clear()
    driver.find_element("id", "max_tokens").send_keys("40")

    _send(driver, "你好，北京")
    assert _wait(lambda: driver.find_element("id", "stop").is_enabled(), what="the stop button")
    partial = _wait(lambda: [t for t in _replies(driver) if t], what="the first streamed piece")
    _wait(lambda: not driver.find_element("id", "stop").is_enabled(), what="the end of the reply")
    final = _replies(driver)[-1]
    assert final and final.startswith(partial[-1]) and len(final) > len(partial[-1]), \
        "the reply should grow piece by piece"
    user_turns = [e.text for e in driver.find_elements("css selector", ".msg.user .content")]
    assert user_turns[-1] == "你好，北京"  # Chinese round-trips through the page intact
    assert not driver.find_element("id", "error").is_displayed()

    # a second turn (multi-turn history) and the stop button
    _send(driver, "再说一遍")
    _wait(lambda: len(_replies(driver)) == 2 and _replies(driver)[-1], what="the second reply to start")
    driver.find_element("id", "stop").click()
    _wait(lambda: not driver.find_element("id", "stop").is_enabled(), what="the stop to take effect")
    assert "stopped" in driver.find_elements("css selector", ".msg.assistant .meta")[-1].text
