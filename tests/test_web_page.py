"""The gateway's web page in a real headless Chromium, as a person uses it: the robin's image with its
AI label, an animation with its progress bar, an e-ink preview, a refused field named by the form and
the rate limit's Retry-After. Against a real `birdgen gateway`, Triton (tiny model) and Redis.

The browser is Debian's chromium and chromium-driver (`make setup` installs them), driven by Selenium
with both paths given, so Selenium Manager never runs and nothing is downloaded. Every wait is on the
page's own state (the output's data-request counter and data-state), never on time.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from birdgen.media import read_animation
from tests.gateway_process import Gateway, running_gateway
from tests.redis_fixture import running_redis

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MISSING = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
# Generous: a generation on a loaded two-core machine. A wait ends as soon as the page says so.
WAIT_S = 120
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"{' and '.join(MISSING)} missing: Debian's chromium and chromium-driver packages "
        "(`make setup` installs them)",
    ),
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    profile = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1800",
        f"--user-data-dir={profile / 'profile'}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-sync",
        "--disable-background-networking",
        "--disable-component-update",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(profile / "chromedriver.log"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")  # Selenium Manager is skipped anyway: both paths are given
        driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page(browser: WebDriver, gateway: Gateway) -> WebDriver:
    """The page at /, its options loaded from the gateway."""
    open_page(browser, gateway.url)
    return browser


def open_page(driver: WebDriver, url: str) -> None:
    driver.get(url + "/")
    wait(driver).until(lambda d: d.find_element(By.ID, "controls").get_attribute("data-ready") == "true")


def wait(driver: WebDriver) -> WebDriverWait:
    return WebDriverWait(driver, WAIT_S)


def choose(driver: WebDriver, control: str, value: str) -> None:
    Select(driver.find_element(By.ID, control)).select_by_value(value)


def type_into(driver: WebDriver, control: str, text: str) -> None:
    element = driver.find_element(By.ID, control)
    element.clear()
    element.send_keys(text)


def press(driver: WebDriver, button: str) -> str:
    """Click a generate button and wait for that request to finish: "done" or "error"."""
    before = int(driver.find_element(By.ID, "output").get_attribute("data-request"))
    wait(driver).until(lambda d: d.find_element(By.ID, button).is_enabled())
    driver.find_element(By.ID, button).click()

    def finished(d: WebDriver) -> str | bool:
        output = d.find_element(By.ID, "output")
        state = output.get_attribute("data-state")
        finished_this = int(output.get_attribute("data-request")) == before + 1
        return state if finished_this and state in ("done", "error") else False

    return wait(driver).until(finished)


def shown(driver: WebDriver) -> tuple[str, bytes]:
    """The result image's data URL: its header and decoded bytes, once the browser has drawn it."""
    wait(driver).until(
        lambda d: d.execute_script(
            "const i = document.getElementById('result-image'); return i.complete && i.naturalWidth > 0"
        )
    )
    assert driver.find_element(By.ID, "result-image").is_displayed()
    header, _, data = driver.find_element(By.ID, "result-image").get_attribute("src").partition(",")
    return header, base64.b64decode(data)


def facts(driver: WebDriver) -> dict[str, str]:
    """The metadata list under the result, term -> value."""
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#metadata dt')]"
        ".map(dt => [dt.textContent, dt.nextElementSibling.textContent]))"
    )


def ai_label(driver: WebDriver) -> str | None:
    label = driver.find_element(By.ID, "ai-label")
    return label.get_attribute("textContent") if label.is_displayed() else None


def console_errors(driver: WebDriver) -> list[str]:
    """The browser console's errors since the last call (a blocked resource, a script error)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(driver: WebDriver, path: Path) -> Path:
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 0 and path.read_bytes()[:8] == PNG_SIGNATURE
    return path


def test_the_page_fills_its_form_from_the_options(page: WebDriver, gateway: Gateway) -> None:
    options = httpx.get(gateway.url + "/api/v1/options", timeout=30).json()
    values = page.execute_script(
        "return Object.fromEntries(['species', 'pose', 'behaviour', 'season', 'style', 'image-size',"
        " 'animation-size', 'panel'].map(id => [id, [...document.getElementById(id).options]"
        ".map(o => o.value)]))"
    )
    assert values["species"] == [s["species_id"] for s in options["species"]]
    for field in ("pose", "behaviour", "season", "style"):
        assert values[field] == ["", *options["vocabulary"][field]]  # "" = the server's default
    assert {"256", "512", "768", "1024"} <= set(values["image-size"])
    assert {"256", "512"} <= set(values["animation-size"])
    assert values["panel"] == options["eink_panels"]
    # Every control has a label, and nothing came from anywhere but the gateway.
    unlabelled = page.execute_script(
        "return [...document.querySelectorAll('input, select, progress')]"
        ".filter(e => !e.labels || e.labels.length === 0).map(e => e.id)"
    )
    assert unlabelled == []
    resources = page.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert {url.split("?")[0] for url in resources} >= {gateway.url + "/static/app.js"}
    assert all(url.startswith(gateway.url + "/") for url in resources), resources
    assert console_errors(page) == []


def test_an_image_of_the_robin_with_its_ai_label(page: WebDriver, tmp_path: Path) -> None:
    type_into(page, "species-filter", "American Robin")
    choose(page, "species", "amerob")
    choose(page, "pose", "perched")
    choose(page, "season", "spring")
    choose(page, "style", "photo")
    choose(page, "image-size", "256")
    choose(page, "image-format", "png")
    type_into(page, "seed", "7")
    type_into(page, "steps", "1")
    assert press(page, "generate-image") == "done"
    header, data = shown(page)
    assert header == "data:image/png;base64" and data[:8] == PNG_SIGNATURE
    assert Image.open(BytesIO(data)).size == (256, 256)
    assert ai_label(page) == "AI-generated"
    about = facts(page)
    assert about["Species"] == "American Robin" and about["Seed"] == "7" and about["Steps"] == "1"
    assert about["Family"] and about["Model version"] and "Robin" in about["Prompt"]
    assert "American Robin" in page.find_element(By.ID, "result-image").get_attribute("alt")
    assert console_errors(page) == []
    screenshot(page, tmp_path / "image.png")


def test_an_animation_with_its_progress_bar(page: WebDriver, tmp_path: Path) -> None:
    choose(page, "species", "amerob")
    choose(page, "behaviour", "flying")
    choose(page, "animation-size", "256")
    choose(page, "animation-format", "webp")
    type_into(page, "duration", "2")
    type_into(page, "fps", "8")
    type_into(page, "steps", "1")
    type_into(page, "seed", "8")
    assert press(page, "generate-animation") == "done"
    bar = page.find_element(By.ID, "progress")
    assert bar.is_displayed()
    # Driven by the streamed lines: denoise, then decode up to its total (not set by the result).
    assert int(bar.get_attribute("data-updates")) >= 2 and bar.get_attribute("data-stage") == "decode"
    assert float(bar.get_property("value")) == float(bar.get_property("max")) > 0
    assert "Decoding frames" in page.find_element(By.ID, "progress-text").text
    header, data = shown(page)
    assert header in ("data:image/webp;base64", "data:image/gif;base64")
    clip = read_animation(data)
    assert clip.frame_count == 16  # 2 s x 8 fps: animated
    assert ai_label(page) == "AI-generated"
    about = facts(page)
    assert about["Frames"] == "16" and about["Seed"] == "8" and about["Species"] == "American Robin"
    assert console_errors(page) == []
    screenshot(page, tmp_path / "animation.png")


def test_an_eink_preview(page: WebDriver, tmp_path: Path) -> None:
    choose(page, "species", "amerob")
    choose(page, "panel", "296x128")
    type_into(page, "seed", "4")
    assert press(page, "generate-eink") == "done"
    header, data = shown(page)
    assert header == "data:image/png;base64" and Image.open(BytesIO(data)).size == (296, 128)
    assert ai_label(page) == "AI-generated"
    about = facts(page)
    assert about["Panel"].startswith("296x128") and about["Seed"] == "4"
    assert console_errors(page) == []
    screenshot(page, tmp_path / "eink.png")


def test_a_refused_field_is_named_by_the_form(page: WebDriver, tmp_path: Path) -> None:
    box = page.find_element(By.ID, "form-error")
    type_into(page, "seed", "-1")
    assert press(page, "generate-image") == "error"
    assert box.is_displayed()
    assert "Seed (seed): invalid 'seed': got -1" in box.text
    seed = page.find_element(By.ID, "seed")
    assert seed.get_attribute("aria-invalid") == "true"
    assert "'seed'" in page.find_element(By.ID, "seed-error").text
    assert "seed-error" in seed.get_attribute("aria-describedby").split()
    screenshot(page, tmp_path / "page.png")
    assert press(page, "generate-eink") == "error"  # a query parameter: named the same way
    assert "Seed (seed): invalid 'seed': got -1" in box.text

    # Another request's field, on its own control; then a good request clears both.
    type_into(page, "seed", "5")
    type_into(page, "fps", "30")
    assert press(page, "generate-animation") == "error"
    assert "Frames per second (fps): invalid 'fps': got 30" in box.text
    assert page.find_element(By.ID, "fps").get_attribute("aria-invalid") == "true"
    assert seed.get_attribute("aria-invalid") is None
    type_into(page, "fps", "8")
    choose(page, "image-size", "256")
    assert press(page, "generate-image") == "done"
    assert not box.is_displayed() and page.find_element(By.ID, "fps").get_attribute("aria-invalid") is None
    assert facts(page)["Seed"] == "5"


def test_the_rate_limit_says_when_to_retry(server, browser: WebDriver, tmp_path: Path) -> None:
    """A gateway allowing one request a minute (its own Redis: a fresh window), in its own tab."""
    with (
        running_redis(tmp_path) as redis_server,
        running_gateway(server.grpc_url, redis_server.url, tmp_path, rate_limit_per_minute=1) as strict,
    ):
        first = browser.current_window_handle
        browser.switch_to.new_window("tab")
        try:
            open_page(browser, strict.url)
            type_into(browser, "seed", "-1")  # refused, and still counted: the limit comes first
            assert press(browser, "generate-image") == "error"
            assert "invalid 'seed'" in browser.find_element(By.ID, "form-error").text
            assert press(browser, "generate-image") == "error"
            text = browser.find_element(By.ID, "form-error").text
            assert "Too many requests (HTTP 429)" in text and "Retry-After" in text
            retry = re.search(r"try again in (\d+) s", text)
            assert retry is not None and 1 <= int(retry.group(1)) <= 60
        finally:
            browser.close()
            browser.switch_to.window(first)
