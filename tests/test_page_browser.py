"""The page at ``/`` in a real headless browser: Debian's chromium driven by selenium.

``.ci/run`` installs ``chromium`` and ``chromium-driver``; nothing is downloaded at test time
(selenium is given both paths, so its driver manager never runs). The screenshot the README
shows is made here: ``docs/page.png``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .server_fixture import Running, running_server

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "page.png"


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


def test_type_a_question_and_see_the_answer_stream(browser: object, server: Running) -> None:
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
    SCREENSHOT.parent.mkdir(exist_ok=True)
    d.save_screenshot(str(SCREENSHOT))  # type: ignore[attr-defined]
    assert SCREENSHOT.stat().st_size > 5000


def test_the_page_loads_nothing_from_elsewhere(server: Running) -> None:
    import httpx

    html = httpx.get(server.url + "/", timeout=10).text
    assert "<script src" not in html and "<link" not in html
    assert "http://" not in html and "https://" not in html


def test_the_page_works_behind_the_api_key(browser: object) -> None:
    """With a key set, the page and its calls need it: a browser asked by the page's 401
    (``WWW-Authenticate: Basic``) sends the key as a Basic password with every request of
    that origin; here the browser is told to send that header (DevTools), as it would after
    the user typed the key in its prompt."""
    import base64

    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from ggufllm.server import ServerConfig

    key = "page-key"
    with running_server(config=ServerConfig(api_key=key)) as keyed:
        bare = httpx.get(keyed.url + "/", timeout=10)
        assert bare.status_code == 401 and bare.headers["www-authenticate"].startswith("Basic")
        d = browser
        basic = "Basic " + base64.b64encode(f"me:{key}".encode()).decode()
        d.execute_cdp_cmd("Network.enable", {})  # type: ignore[attr-defined]
        d.execute_cdp_cmd("Network.setExtraHTTPHeaders",  # type: ignore[attr-defined]
                          {"headers": {"Authorization": basic}})
        try:
            d.get(keyed.url + "/")  # type: ignore[attr-defined]
            wait = WebDriverWait(d, 180)
            wait.until(lambda d: "gemma" in d.find_element(By.ID, "model").text)
            d.find_element(By.ID, "question").send_keys("Name a river.")  # type: ignore[attr-defined]
            box = d.find_element(By.ID, "max_tokens")  # type: ignore[attr-defined]
            box.clear()
            box.send_keys("8")
            d.find_element(By.ID, "ask").click()  # type: ignore[attr-defined]
            wait.until(lambda d: d.find_elements(By.ID, "finish"))
            assert d.find_element(By.ID, "answer").text.strip()  # type: ignore[attr-defined]
            assert d.find_element(By.ID, "error").text == ""  # type: ignore[attr-defined]
        finally:
            d.execute_cdp_cmd("Network.setExtraHTTPHeaders",  # type: ignore[attr-defined]
                              {"headers": {}})
