"""The page at ``/`` in a real headless browser: Debian's chromium driven by selenium.

``.ci/run`` installs ``chromium`` and ``chromium-driver``; nothing is downloaded at test time
(selenium is given both paths, so its driver manager never runs). The screenshot docs/server.md
shows is made here: ``GGUFLLM_SCREENSHOT=docs/page.png python -m pytest tests/test_page_browser.py``
refreshes it (without the variable the screenshot goes to the test's temporary folder).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import http_calls as http
from .server_fixture import Running, running_server

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run "
                    "installs them: apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=900,560", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    with running_server() as running:
        yield running


def test_type_a_question_and_see_the_answer_stream(browser: object, server: Running,
                                                   tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    d.get(server.url + "/")  # type: ignore[attr-defined]
    wait = WebDriverWait(d, 180)
    wait.until(lambda d: "gemma" in d.find_element(By.ID, "model").text)
    d.find_element(By.ID, "context").send_keys(  # type: ignore[attr-defined]
        "Paris is the capital and largest city of France.")
    d.find_element(By.ID, "question").send_keys("What is the capital of France?")  # type: ignore[attr-defined]
    for field, value in (("max_tokens", "24"), ("temperature", "0")):
        box = d.find_element(By.ID, field)  # type: ignore[attr-defined]
        box.clear()
        box.send_keys(value)
    d.find_element(By.ID, "ask").click()  # type: ignore[attr-defined]
    wait.until(lambda d: d.find_elements(By.ID, "finish"))
    answer = d.find_element(By.ID, "answer").text  # type: ignore[attr-defined]
    assert answer.strip()
    assert d.find_element(By.ID, "ttft").text.endswith(" s")  # type: ignore[attr-defined]
    assert d.find_element(By.ID, "error").text == ""  # type: ignore[attr-defined]
    screenshot = Path(os.environ.get("GGUFLLM_SCREENSHOT") or tmp_path / "page.png")
    d.save_screenshot(str(screenshot))  # type: ignore[attr-defined]
    assert screenshot.stat().st_size > 5000


def test_the_page_loads_nothing_from_elsewhere(server: Running) -> None:

    html = http.get(server.url + "/", timeout=10).text
    assert "<script src" not in html and "<link" not in html
    assert "http://" not in html and "https://" not in html


def test_the_page_works_behind_the_api_key(browser: object) -> None:
    """With a key set, the page and its calls need it. The browser gets the page as a user
    would after typing the key in the browser's own prompt (the page's 401 says
    ``WWW-Authenticate: Basic``): credentials in the URL. Nothing else adds a header, so
    the page's calls carry the key only if the page sends it (the key field it shows
    when its API calls get 401, where the user types it)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from ggufllm.server import ServerConfig

    key = "page-key"
    with running_server(config=ServerConfig(api_key=key)) as keyed:
        bare = http.get(keyed.url + "/", timeout=10)
        assert bare.status_code == 401 and bare.headers["www-authenticate"].startswith("Basic")
        d = browser
        # the credentials a user types in the browser's prompt: the browser keeps them for
        # the origin; the page is then opened at its plain address (a page whose own address
        # holds credentials cannot fetch relative URLs at all)
        d.get(keyed.url.replace("http://", f"http://me:{key}@") + "/")  # type: ignore[attr-defined]
        d.get(keyed.url + "/")  # type: ignore[attr-defined]
        wait = WebDriverWait(d, 180)
        wait.until(lambda d: d.find_element(By.ID, "model").text not in ("", "loading…"))
        assert "unreachable" not in d.find_element(By.ID, "model").text  # type: ignore[attr-defined]
        if "API key needed" in d.find_element(By.ID, "model").text:  # type: ignore[attr-defined]
            field = d.find_element(By.ID, "apikey")  # type: ignore[attr-defined]
            assert field.is_displayed()
            field.send_keys(key + Keys.TAB)  # "change": the page asks again, with the key
        wait.until(lambda d: "gemma" in d.find_element(By.ID, "model").text)
        d.find_element(By.ID, "question").send_keys("Name a river.")  # type: ignore[attr-defined]
        box = d.find_element(By.ID, "max_tokens")  # type: ignore[attr-defined]
        box.clear()
        box.send_keys("8")
        d.find_element(By.ID, "ask").click()  # type: ignore[attr-defined]
        wait.until(lambda d: d.find_elements(By.ID, "finish"))
        assert d.find_element(By.ID, "answer").text.strip()  # type: ignore[attr-defined]
        assert d.find_element(By.ID, "error").text == ""  # type: ignore[attr-defined]


# Keeps the raw SSE body of every /answer call the page makes (a clone of the response, read
# beside the page's own reader), so the test sees exactly what the server sent the page.
_RECORD_ANSWERS = """
window.__answers = [];
const pageFetch = window.fetch;
window.fetch = async (...args) => {
  const r = await pageFetch(...args);
  if (String(args[0]).endsWith("/answer")) r.clone().text().then((t) => window.__answers.push(t));
  return r;
};
"""


def _ask_on_page(d: object, question: str, max_tokens: int, n_before: int) -> tuple[dict, float]:
    """Types the question, clicks Ask, waits for the end; returns the server's last event and
    the seconds from the click to the page showing the end."""
    import json
    import time

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = d.find_element(By.ID, "question")  # type: ignore[attr-defined]
    box.clear()
    box.send_keys(question)
    for field, value in (("max_tokens", str(max_tokens)), ("temperature", "0")):
        box = d.find_element(By.ID, field)  # type: ignore[attr-defined]
        box.clear()
        box.send_keys(value)
    start = time.monotonic()
    d.find_element(By.ID, "ask").click()  # type: ignore[attr-defined]
    WebDriverWait(d, 180, poll_frequency=0.05).until(
        lambda d: d.find_elements(By.ID, "finish")
        and d.execute_script("return window.__answers.length") > n_before)
    wall_s = time.monotonic() - start
    assert d.find_element(By.ID, "error").text == ""  # type: ignore[attr-defined]
    body = d.execute_script("return window.__answers[window.__answers.length - 1]")  # type: ignore[attr-defined]
    events = [e.removeprefix("data: ") for e in body.split("\n\n") if e.startswith("data: ")]
    last = json.loads([e for e in events if e != "[DONE]"][-1])
    assert "finish_reason" in last, last
    return last, wall_s


def test_tokens_per_second_is_the_decode_rate_and_absent_for_a_few_tokens(
        browser: object, server: Running) -> None:
    """The tok/s figure is generated tokens over decode time, as the server measured it
    (its last event's ``timings``), not over the moments a few events took to arrive: three
    tokens in one network read used to read "2000.0 tok/s". Below eight tokens the page
    shows no rate at all."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    d.get(server.url + "/")  # type: ignore[attr-defined]
    WebDriverWait(d, 180).until(lambda d: "gemma" in d.find_element(By.ID, "model").text)
    d.execute_script(_RECORD_ANSWERS)  # type: ignore[attr-defined]

    short, _ = _ask_on_page(d, "Name a river.", 3, 0)
    assert short["usage"]["completion_tokens"] <= 3
    assert not d.find_elements(By.ID, "tps"), d.find_element(By.ID, "stats").text  # type: ignore[attr-defined]

    long, wall_s = _ask_on_page(
        d, "Explain how a bicycle works, step by step, in several paragraphs.", 64, 1)
    n, timings = long["usage"]["completion_tokens"], long["timings"]
    assert n >= 16, f"the model stopped after {n} tokens: the test needs a longer answer"
    shown = float(d.find_element(By.ID, "tps").text.removesuffix(" tok/s"))  # type: ignore[attr-defined]
    stats = d.find_element(By.ID, "stats").text  # type: ignore[attr-defined]
    # the server's own figure, and the same from its counts (both rounded in the event)
    assert 0.8 <= shown / timings["decode_tokens_per_s"] <= 1.25, (stats, timings)
    assert 0.8 <= shown / (n / timings["decode_s"]) <= 1.25, (stats, n, timings)
    # decoding is part of the wait the test saw: the rate cannot be below tokens over it
    assert shown >= 0.8 * n / wall_s, (stats, n, wall_s)
