"""`llmcxr serve` in a real headless Chromium (Debian's /usr/bin/chromium driven by playwright): the
page loads, says the sampler is ready, takes an uploaded 16-bit PNG, writes the report the model
writes for that file, and is saved as a screenshot (docs/serve_report.png is one, palette-reduced)."""
import glob
import os

import numpy as np
import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"  # Debian's package; install.sh installs it
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage",
        "--no-first-run", "--disable-extensions"]


@pytest.fixture
def chromium():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent; install.sh installs Debian's chromium for the browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser, sync_api.expect
        browser.close()


def test_page_writes_the_report_of_an_upload(chromium, served, quick_demo, tmp_path):
    browser, expect = chromium
    cxr = sorted(glob.glob(os.path.join(quick_demo.workdir, "corpus", "files", "**", "*.jpg"), recursive=True))[1]
    upload = str(tmp_path / "cxr16.png")  # a 16-bit PNG bigger than the model's 32 px, as from DICOM
    Image.fromarray(np.asarray(Image.open(cxr).convert("L").resize((256, 256)), np.uint16) * 257).save(upload)
    # what the page's button runs (with a progress listener: the decoder the server compiled)
    expected = served.session.report(upload, 0, 1.0, progress=lambda done, total: None)

    page = browser.new_page(viewport={"width": 1000, "height": 640})
    page.goto(served.url)
    expect(page.locator("#status")).to_contain_text("Ready", timeout=30_000)
    button = page.locator("#report-button")
    expect(button).to_be_enabled()
    page.locator("#report-image input[type=file]").set_input_files(upload)
    expect(page.locator("#report-image img")).to_be_visible(timeout=15_000)
    button.click()
    text = page.locator("#report-text textarea")
    expect(text).not_to_have_value("", timeout=60_000)
    assert text.input_value() == expected  # the page shows what the model wrote for that file
    shot = tmp_path / "serve_report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] == 1000
