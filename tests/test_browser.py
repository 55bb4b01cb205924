"""The dashboard in a real browser: `streamlit run app.py` on a loopback port, driven by Playwright + Chromium.

Every page is reached through the sidebar (never a deep link: a `pages/` folder would start Streamlit's legacy
multipage mode), its title asserted, its checks run and a screenshot saved. Screenshots go to a temporary folder unless
VLMREL_SCREENSHOTS names one: `VLMREL_SCREENSHOTS=docs/screenshots python -m pytest tests/test_browser.py` refreshes
the README's pictures deliberately (a plain test run never rewrites tracked files).
Adding a page is one line in PAGES. With CI=true a missing browser fails; locally it skips with the reason.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from conftest import REPO
from streamlit_server import ServerError, streamlit_server

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS_ENV = os.environ.get("VLMREL_SCREENSHOTS")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
SAMPLE_IMAGE = next((REPO / "sample_data" / "shapes_pope" / "images").glob("*.png"))


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"browser test cannot run in CI: {reason}")
    pytest.skip(reason)


try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # the test extra installs it; say so instead of erroring at collection
    sync_playwright = None
    Page = object


# ------------------------------------------------------------------------------------------- page checks


def _check_inspect(page: "Page") -> None:
    page.get_by_role("button", name="Ask").wait_for()
    assert page.locator('[data-testid="stTextInput"] input').input_value()  # prefilled shipped question


def _metric_value(page: "Page", label: str) -> str:
    metric = page.locator('[data-testid="stMetric"]').filter(has=page.locator('[data-testid="stMetricLabel"]', has_text=label))
    return metric.first.locator('[data-testid="stMetricValue"]').inner_text().strip()


def _press_slider(page: "Page", label: str, key: str, times: int) -> None:
    """Move a slider by keyboard: Streamlit 1.67 sliders are a hidden ``input[type=range]`` labelled by the widget's
    label, which takes arrow keys; then wait for the rerun."""
    slider = page.locator(f'[data-testid="stSlider"] input[type="range"][aria-label="{label}"]')
    slider.focus()
    for _ in range(times):
        slider.press(key)
    _settle(page, 1.0)


def _check_layer_sweep(page: "Page") -> None:
    page.locator(".main-svg").first.wait_for()
    before = _metric_value(page, "Held-out AUROC there")
    page.get_by_text("held-out items", exact=True).click()
    _settle(page)
    assert _metric_value(page, "Held-out AUROC there") != before


def _check_calibration(page: "Page") -> None:
    page.locator(".main-svg").first.wait_for()
    before = _metric_value(page, "Coverage (test)")
    _press_slider(page, "Target risk (error rate among served answers)", "ArrowRight", 5)
    assert _metric_value(page, "Coverage (test)") != before


def _check_attention(page: "Page") -> None:
    page.locator(".main-svg").first.wait_for()
    assert page.locator('[data-testid="stMetricLabel"]', has_text="attention entropy (layer-mean map)").count()
    page.locator('[data-testid="stSelectbox"]').filter(has_text="Attention signal").click()
    page.get_by_role("option", name="cluster count C_k").click()
    _settle(page)
    page.locator('[data-testid="stMetricLabel"]', has_text="C_k (layer-mean map)").wait_for()


def _check_masking(page: "Page") -> None:
    page.locator(".main-svg").first.wait_for()
    assert not page.get_by_text("patches greyed (").count()
    _press_slider(page, "Share of image patches greyed", "ArrowRight", 6)
    page.get_by_text("patches greyed (").first.wait_for()  # the example's masked image is drawn


def _check_monitoring(page: "Page") -> None:
    page.locator(".main-svg").first.wait_for()
    assert _metric_value(page, "Alert") == "no"
    page.get_by_role("radiogroup", name="Comparison").get_by_text("shifted", exact=True).click()
    _settle(page)
    assert _metric_value(page, "Alert") == "yes"
    for label, value in (("Questions (first N)", "16"), ("Window (decisions per drift check)", "8")):
        field = page.get_by_role("spinbutton", name=label)
        field.fill(value)
        field.press("Enter")
        _settle(page)
    page.get_by_role("button", name="Run batch").click()
    page.get_by_text("Windows alerting").first.wait_for(timeout=120_000)
    _settle(page)
    assert _metric_value(page, "Windows alerting").endswith("/2")


@dataclass(frozen=True)
class PageCheck:
    link: str  # sidebar link text (without the icon)
    title: str  # the page's h1
    check: Callable[["Page"], None]
    screenshot: str


PAGES = [
    PageCheck("Inspect", "Inspect — will this answer be right?", _check_inspect, "inspect.png"),
    PageCheck("Layer sweep", "Layer sweep — where in depth reliability lives", _check_layer_sweep, "layer_sweep.png"),
    PageCheck("Calibration", "Calibration — can the confidence be trusted?", _check_calibration, "calibration.png"),
    PageCheck("Attention vs hidden state", "Attention vs hidden state", _check_attention, "attention.png"),
    PageCheck("Neuron masking", "Neuron masking — does the model use what the probe reads?", _check_masking, "masking.png"),
    PageCheck("Monitoring", "Monitoring — is the gate still calibrated?", _check_monitoring, "monitoring.png"),
]


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLMREL_CACHE_DIR": str(tmp_path_factory.mktemp("vlmrel_cache")),
           "VLMREL_MASKING_QUESTIONS": "16"}  # the masking page re-runs 16 questions per change, not 300
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    try:
        with streamlit_server(env, log) as url:
            yield url
    except ServerError as err:
        pytest.fail(str(err))


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    if not CHROMIUM.is_file():
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=server)
    page = context.new_page()
    page.set_default_timeout(120_000)
    yield page
    context.close()


# ------------------------------------------------------------------------------------------- helpers


def _settle(page: "Page", quiet_s: float = 0.5) -> None:
    """Wait for the connection, for the DOM to stop changing for ``quiet_s``, then for the script to finish."""
    page.locator('[data-testid="stApp"][data-test-connection-state="CONNECTED"]').wait_for()
    page.evaluate(
        """quiet => new Promise(resolve => {
            let timer = setTimeout(done, quiet);
            const observer = new MutationObserver(() => { clearTimeout(timer); timer = setTimeout(done, quiet); });
            function done() { observer.disconnect(); resolve(); }
            observer.observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
        })""",
        int(quiet_s * 1000),
    )
    page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for()


def _open_home(page: "Page") -> float:
    start = time.perf_counter()
    page.goto("/")
    page.locator("h1").first.wait_for()
    drawn = time.perf_counter() - start
    _settle(page)
    return drawn


def _title(page: "Page") -> str:
    return page.locator("h1").first.inner_text().strip()


def _screenshot(page: "Page", name: str) -> None:
    """Grow the viewport to the content (the app scrolls inside its main container), then save a small PNG."""
    height = page.evaluate('document.querySelector(\'[data-testid="stMain"]\')?.scrollHeight || 900')
    page.set_viewport_size({"width": 1280, "height": min(max(int(height), 900), 3000)})
    _settle(page, 0.3)
    folder = Path(SCREENSHOTS_ENV) if SCREENSHOTS_ENV else Path(os.environ.get("TMPDIR", "/tmp")) / "vlmrel-screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    with Image.open(path) as shot:  # 128-colour palette: a README picture, a fraction of the bytes
        small = shot.convert("RGB").quantize(colors=128)
    small.save(path, optimize=True)
    page.set_viewport_size({"width": 1280, "height": 900})


def _errors(page: "Page") -> list[str]:
    """Error messages (not exception boxes, which also contain an error-kind alert)."""
    alerts = page.locator('[data-testid="stAlert"]:has([data-testid="stAlertContentError"])')
    return [alerts.nth(i).inner_text() for i in range(alerts.count())
            if not alerts.nth(i).locator('xpath=ancestor::*[@data-testid="stException"]').count()]


def _metric(page: "Page", label: str) -> str:
    metric = page.locator('[data-testid="stMetric"]').filter(has=page.locator(
        '[data-testid="stMetricLabel"]', has_text=label))
    return metric.locator('[data-testid="stMetricValue"]').inner_text().strip()


def _upload(page: "Page", **file) -> None:
    page.get_by_text("upload", exact=True).click()
    _settle(page)
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(files=[file] if file else [])
    _settle(page)


# ------------------------------------------------------------------------------------------- tests


def test_every_page_through_the_sidebar(page):
    drawn = _open_home(page)
    assert drawn < 30, f"the first page took {drawn:.1f} s to draw"
    print(f"first page drawn in {drawn:.2f} s")
    assert _title(page) == PAGES[0].title  # served at / before any navigation
    for spec in PAGES:
        page.locator('[data-testid="stSidebarNavLink"]', has_text=spec.link).click()
        _settle(page)
        page.locator("h1", has_text=spec.title).wait_for()
        assert _title(page) == spec.title
        spec.check(page)
        assert not page.locator('[data-testid="stException"]').count()
        _screenshot(page, spec.screenshot)


def test_inspect_upload_an_image_and_read_back_answer_and_confidence(page):
    _open_home(page)
    _upload(page, name="shapes.png", mimeType="image/png", buffer=SAMPLE_IMAGE.read_bytes())
    question = page.locator('[data-testid="stTextInput"] input')
    question.fill("is there a red circle in the image?")
    question.press("Tab")  # a text input sends its value on blur
    _settle(page)
    start = time.perf_counter()
    page.get_by_role("button", name="Ask").click()
    page.locator('[data-testid="stMetric"]').first.wait_for()
    _settle(page)
    print(f"Ask → answer drawn in {time.perf_counter() - start:.2f} s (first ask loads the model)")
    assert not _errors(page) and not page.locator('[data-testid="stException"]').count()
    assert _metric(page, "Answer") not in {"", "(empty)"}
    confidence = float(_metric(page, "Confidence"))
    assert 0.0 <= confidence <= 1.0
    page.locator(".main-svg").first.wait_for()  # the gauge is drawn, not only mounted
    _screenshot(page, "inspect_answer.png")

    start = time.perf_counter()  # once loaded: a second ask
    page.get_by_role("button", name="Ask").click()
    _settle(page)
    print(f"second Ask → answer in {time.perf_counter() - start:.2f} s")
    assert float(_metric(page, "Confidence")) == pytest.approx(confidence, abs=1e-3)


def test_a_non_image_upload_shows_one_clear_error(page):
    _open_home(page)
    _upload(page, name="notes.txt", mimeType="text/plain", buffer=b"this is not an image")
    errors = _errors(page)
    assert len(errors) == 1 and "notes.txt: not an image" in errors[0], errors
    assert not page.locator('[data-testid="stException"]').count()
    assert page.get_by_role("button", name="Ask").is_disabled()
    _screenshot(page, "inspect_bad_upload.png")
