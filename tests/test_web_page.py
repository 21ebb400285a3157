"""The web chat page in a real browser: Debian's chromium, driven headless by selenium, against a live
`easygen serve` on the CI demo model. Upload an image and ask, ask for a drawing and see it, start a new
chat; a bad upload shows the server's own reason and the page goes on working; the API-key field of a
server that needs a key."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from .serving import easygen_serve

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]
CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
                ".ci/run installs them)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@contextlib.contextmanager
def browser(base: str, profile: Path):
    """Headless chromium on ``base``/ with a fresh profile and a 1000x800 page (the README screenshot's size)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1000,800", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # an explicit driver: selenium-manager never looks for (or downloads) one
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    try:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 1000, "height": 800, "deviceScaleFactor": 1, "mobile": False})
        driver.get(base + "/")
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page(ci_demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("page")
    with easygen_serve(ci_demo.easygen, tmp, "--temperature", "0", "--steps", "2") as base, \
            browser(base, tmp / "profile") as driver:
        yield driver, tmp


def shape_file(path: Path, rgb=(40, 80, 220)) -> Path:
    im = Image.new("RGB", (96, 80), "white")
    ImageDraw.Draw(im).ellipse((20, 12, 76, 68), fill=rgb)
    im.save(path)
    return path


def busy(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-busy")


def ask(driver, text: str, files: list[Path] = ()) -> None:
    for f in files:
        driver.find_element(By.ID, "attach").send_keys(str(f))
    WebDriverWait(driver, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pending img")) == len(files))
    box = driver.find_element(By.ID, "message")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 60).until(lambda d: busy(d) == "false")


def assistant_messages(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")


def test_ask_about_an_upload_then_get_a_drawing_then_start_over(page):
    driver, tmp = page
    assert not driver.find_element(By.ID, "api-key").is_displayed()  # this server needs no key
    ask(driver, "What is in the picture?", [shape_file(tmp / "blue.png")])
    assert driver.find_element(By.ID, "error").text == ""
    first = assistant_messages(driver)[-1].find_element(By.CLASS_NAME, "body").text
    assert first.strip() and "<Img" not in first
    assert len(driver.find_elements(By.CSS_SELECTOR, "#messages .msg.user img")) == 1  # the upload's thumbnail

    # the CI model is barely trained and may not draw this late in a conversation: ask for a picture
    driver.find_element(By.ID, "force-image").click()
    ask(driver, "Draw a red circle.")
    driver.find_element(By.ID, "force-image").click()
    last = assistant_messages(driver)[-1]
    images = last.find_elements(By.TAG_NAME, "img")
    assert len(images) == 1 and images[0].get_attribute("src").startswith("data:image/png;base64,")
    assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", images[0]) == 64
    assert "<Img" not in last.text and "base64" not in last.text
    assert len(assistant_messages(driver)) == 2  # several turns
    driver.save_screenshot(str(tmp / "page.png"))
    if os.environ.get("EASYGEN_SCREENSHOT"):
        driver.save_screenshot(os.environ["EASYGEN_SCREENSHOT"])

    driver.find_element(By.ID, "reset").click()
    assert driver.find_elements(By.CSS_SELECTOR, "#messages .msg") == []


def test_a_failure_shows_the_real_reason_and_the_page_goes_on(page):
    driver, tmp = page
    junk = tmp / "not-really.png"
    junk.write_bytes(b"\x89PNG this is not an image")
    ask(driver, "What is this?", [junk])
    error = driver.find_element(By.ID, "error").text
    assert error.startswith("400: ") and "could not be read" in error
    assert driver.find_element(By.ID, "message").get_attribute("value") == "What is this?"  # nothing typed is lost
    driver.find_element(By.CSS_SELECTOR, "#pending button").click()  # remove the bad attachment
    ask(driver, "What shape is it?")
    assert driver.find_element(By.ID, "error").text == ""
    assert assistant_messages(driver)[-1].find_element(By.CLASS_NAME, "body").text.strip()


def test_the_api_key_field_when_the_server_needs_one(ci_demo, tmp_path):
    with easygen_serve(ci_demo.easygen, tmp_path, "--temperature", "0", "--steps", "2", "--api-key", "s3cret") as base:
        with browser(base, tmp_path / "profile") as driver:
            key = driver.find_element(By.ID, "api-key")
            assert key.is_displayed()
            ask(driver, "Hello")  # no key yet: the server's 401, word for word
            assert driver.find_element(By.ID, "error").text.startswith("401: Incorrect or missing API key")
            key.send_keys("s3cret")
            ask(driver, "Hello")
            assert driver.find_element(By.ID, "error").text == ""
            assert assistant_messages(driver)[-1].find_element(By.CLASS_NAME, "body").text.strip()
            driver.refresh()  # the key is remembered (localStorage), the conversation is not
            assert driver.find_element(By.ID, "api-key").get_attribute("value") == "s3cret"
            assert driver.find_elements(By.CSS_SELECTOR, "#messages .msg") == []


FAKE_FETCH = """
const [events, hang] = arguments;
window.fetch = (url, options) => {
  const body = new ReadableStream({start(c) {
    const enc = new TextEncoder();
    for (const e of events) c.enqueue(enc.encode(e));
    if (hang) options.signal.addEventListener("abort", () => c.error(new DOMException("aborted", "AbortError")));
    else c.close();
  }});
  return Promise.resolve(new Response(body, {status: 200, headers: {"Content-Type": "text/event-stream"}}));
};
"""


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def test_stream_edge_cases_with_a_stand_in_server(page):
    """What the demo model will not do on cue, from a stand-in fetch: a picture whose markdown is
    malformed, an error in mid-stream, a reply stopped by the user."""
    driver, tmp = page
    driver.find_element(By.ID, "reset").click()
    png = base64.b64encode(shape_file(tmp / "drawn.png").read_bytes()).decode()
    url = f"data:image/png;base64,{png}"
    delta = lambda d: sse({"choices": [{"index": 0, "delta": d}]})  # noqa: E731
    try:
        driver.execute_script(FAKE_FETCH, [": waiting\n\n", delta({"content": "Here: "}),
                                           delta({"content": f"![a [red] circle]({url})",
                                                  "images": [{"type": "image_url", "image_url": {"url": url}}]}),
                                           "data: [DONE]\n\n"], False)
        ask(driver, "Draw a red circle.")
        last = assistant_messages(driver)[-1]
        assert last.find_element(By.CLASS_NAME, "body").text.strip() == "Here:"  # no markdown, no base64
        assert [im.get_attribute("alt") for im in last.find_elements(By.TAG_NAME, "img")] == ["a [red] circle"]

        driver.execute_script(FAKE_FETCH, [delta({"content": "Hal"}), sse({"error": {
            "message": "the engine failed on this request", "type": "server_error"}})], False)
        ask(driver, "Again")
        assert driver.find_element(By.ID, "error").text == "500: the engine failed on this request"
        assert len(assistant_messages(driver)) == 1  # the failed turn is gone, its text is back in the box
        assert driver.find_element(By.ID, "message").get_attribute("value") == "Again"

        driver.execute_script(FAKE_FETCH, [delta({"content": "Once upon"})], True)
        driver.find_element(By.ID, "message").clear()
        driver.find_element(By.ID, "message").send_keys("Tell a story\n")  # Enter sends
        WebDriverWait(driver, 10).until(lambda d: "Once upon" in assistant_messages(d)[-1].text)
        assert busy(driver) == "true" and not driver.find_element(By.ID, "send").is_enabled()
        driver.find_element(By.ID, "stop").click()
        WebDriverWait(driver, 10).until(lambda d: busy(d) == "false")
        assert driver.find_element(By.ID, "error").text.startswith("stopped")
        assert len(assistant_messages(driver)) == 1
    finally:
        driver.refresh()  # the real fetch again
