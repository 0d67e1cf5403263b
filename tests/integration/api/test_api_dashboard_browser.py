"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

Loads the dashboard of a six-round sample project served by uvicorn, checks each chart shows the seeded rounds and
the thumbnails load, and saves a full-page screenshot whose path is printed.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from api_live import READ_TOKEN, SAMPLE_ROUNDS, LiveServer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    reason = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
    if os.environ.get("DEFECT_LOOP_REQUIRE_BROWSER"):
        pytest.fail(f"DEFECT_LOOP_REQUIRE_BROWSER is set but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():  # noqa: ANN201
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1440,900",
                     "--hide-scrollbars", "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot_path() -> Path:
    directory = Path(os.environ.get("DEFECT_LOOP_ARTIFACTS_DIR", Path(tempfile.gettempdir()) / "defect-loop-artifacts"))
    directory.mkdir(parents=True, exist_ok=True)
    return directory / "dashboard.png"


def test_dashboard_shows_seeded_rounds(browser, live_server: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{live_server.base_url}/dashboard?token={READ_TOKEN}")
    WebDriverWait(browser, 30).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "section#issues")))
    assert "bottle-line" in browser.title
    expected_rounds = ",".join(str(n) for n in range(1, SAMPLE_ROUNDS + 1))

    gate_charts = browser.find_elements(By.CSS_SELECTOR, 'svg.chart[data-chart^="gate:"]')
    assert {chart.get_attribute("data-chart") for chart in gate_charts} == {"gate:macro_f1", "gate:defect_recall", "gate:negative_fpr", "gate:latency_ms"}
    for chart in gate_charts:
        assert chart.get_attribute("data-rounds") == expected_rounds
        points = chart.find_elements(By.CSS_SELECTOR, "circle.point")
        assert [p.get_attribute("data-round") for p in points] == [str(n) for n in range(1, SAMPLE_ROUNDS + 1)]
        assert len(chart.find_elements(By.CSS_SELECTOR, "line.threshold")) == 1
        # The browser laid the chart out: it has a real size on the page.
        assert chart.size["width"] > 250 and chart.size["height"] > 100
    x_labels = [t.text for t in gate_charts[0].find_elements(By.CSS_SELECTOR, "text.xlabel")]
    assert x_labels == [f"R{n}" for n in range(1, SAMPLE_ROUNDS + 1)]

    bars = browser.find_elements(By.CSS_SELECTOR, 'svg[data-chart="labels-by-source"] rect.bar')
    assert {b.get_attribute("data-round") for b in bars} == {str(n) for n in range(1, SAMPLE_ROUNDS + 1)}
    assert {b.get_attribute("data-series") for b in bars} == {"import", "annotator", "oracle"}

    f1_points = browser.find_elements(By.CSS_SELECTOR, 'svg[data-chart="per-class-f1"] circle.point')
    assert len(f1_points) == 4 * SAMPLE_ROUNDS
    assert browser.find_element(By.CSS_SELECTOR, "table.confusion").get_attribute("data-round") == str(SAMPLE_ROUNDS)

    for metric in ("loss", "accuracy"):  # the latest round's fine-tuning curves, train and validation, the kept epoch marked
        chart = browser.find_element(By.CSS_SELECTOR, f'svg[data-chart="training:{metric}"]')
        assert len(chart.find_elements(By.CSS_SELECTOR, "circle.point")) == 2 * 7 and chart.size["width"] > 250
        assert len(chart.find_elements(By.CSS_SELECTOR, "line.kept-epoch")) == 1
    assert len(browser.find_elements(By.CSS_SELECTOR, "table.noise tr[data-class]")) == 4

    issue_rows = browser.find_elements(By.CSS_SELECTOR, "table.issues tr.issue")
    assert len(issue_rows) >= 3
    thumbnails = browser.find_elements(By.CSS_SELECTOR, "table.issues img.thumb")
    for image in thumbnails:
        browser.execute_script("arguments[0].scrollIntoView();", image)
    WebDriverWait(browser, 15).until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0;", i) for i in thumbnails))

    browser.execute_script("window.scrollTo(0, 0);")
    # Grow the window until the whole page fits (the window's own frame takes part of its height).
    for _ in range(3):
        missing = browser.execute_script("return document.documentElement.scrollHeight - window.innerHeight;")
        if missing <= 0:
            break
        browser.set_window_size(1440, min(browser.get_window_size()["height"] + int(missing) + 8, 5000))
    path = screenshot_path()
    assert browser.save_screenshot(str(path))
    assert path.stat().st_size > 20_000
    with capsys.disabled():
        print(f"\n[dashboard screenshot] {path}")


def test_the_api_docs_render_offline(browser, live_server: LiveServer) -> None:  # noqa: ANN001
    # FastAPI's default /docs loads Swagger UI from a CDN (blank offline), and Swagger UI 4 refuses FastAPI's OpenAPI 3.1
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{live_server.base_url}/docs")
    WebDriverWait(browser, 30).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".opblock-summary-path")))
    paths = {element.text.replace("\u200b", "") for element in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/predict", "/rounds/{round_id}", "/webhooks/labelstudio"} <= paths
    assert "Unable to render" not in browser.page_source
