"""The web page at ``/`` in a real headless browser (Debian's chromium + chromium-driver, driven by Selenium).

The page is loaded from a real ``xmodal serve`` process; an image is chosen through the file input, and the
test checks that the top-5 bars show the classes and probabilities the classifier gives in process, and
that the model card shows method, backbone (with the stand-in flag) and validation accuracy.

Skips only when no browser is installed (``apt-get install -y chromium chromium-driver``). The screenshot goes
to the test's temporary folder, or to ``$XMODAL_SCREENSHOT`` when set (``docs/img/serve-page.png`` is made
that way, see docs/serve.md); ``$XMODAL_SCREENSHOT_MODEL`` / ``$XMODAL_SCREENSHOT_IMAGE`` serve another saved
classifier and image for it.
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from xmodal.serve.process import ServerProcess

CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1180,760", "--hide-scrollbars"]


def _browser() -> tuple[str, str]:
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("no browser: chromium and chromium-driver are not installed "
                    "(apt-get install -y chromium chromium-driver; .ci/run does this)")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -r requirements.txt)")
    return chrome, driver


@pytest.fixture
def browser(tmp_path):
    chrome, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must not try the network
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def served(tmp_path):
    """(classifier, model folder, image to upload): a tiny:clip model on six classes, or the screenshot's."""
    from xmodal.serve.testing import fit_tiny_classifier

    model_env, image_env = os.environ.get("XMODAL_SCREENSHOT_MODEL"), os.environ.get("XMODAL_SCREENSHOT_IMAGE")
    if model_env and image_env:
        from xmodal.classifier import FewShotClassifier

        return FewShotClassifier.load(model_env, device="cpu"), Path(model_env), Path(image_env)
    clf, model_dir, folder = fit_tiny_classifier(tmp_path / "fit", classes=6)
    return clf, model_dir, sorted((folder / "test").rglob("*.png"))[0]


def test_page_classifies_a_chosen_image_and_shows_the_card(browser, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    clf, model_dir, image = served
    expected = clf.predict_proba([Image.open(io.BytesIO(image.read_bytes())).convert("RGB")])[0]
    scores, idx = torch.topk(expected, min(5, len(clf.classes_)))
    env = {k: v for k, v in os.environ.items() if k != "XMODAL_API_TOKEN"}
    with ServerProcess(model_dir, ["--log-level", "warning", "--device", "cpu"], env=env) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.ID, "card").get_attribute("data-loaded") == "1")
        browser.find_element(By.ID, "file").send_keys(str(image.resolve()))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#bars .bar")) == len(idx))
        wait.until(EC.visibility_of_element_located((By.ID, "preview")))

        bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
        assert len(bars) == 5
        labels = [b.find_element(By.CLASS_NAME, "label").text for b in bars]
        assert labels == [clf.classes_[i] for i in idx.tolist()]
        shown = [float(b.find_element(By.CLASS_NAME, "pct").text.rstrip("%")) for b in bars]
        assert shown == pytest.approx([round(100 * s, 1) for s in scores.tolist()], abs=0.051)
        wait.until(lambda d: all(b.find_element(By.CLASS_NAME, "fill").size["width"] > 0 for b in bars))
        widths = [b.find_element(By.CLASS_NAME, "fill").size["width"] for b in bars]
        assert widths == sorted(widths, reverse=True)  # bar lengths follow the probabilities

        card = browser.find_element(By.ID, "card").text
        info = clf.card()
        assert info["method"] in card and info["backbone"] in card
        assert ("offline stand-in, not CLIP" in card) == bool(info["stand_in"])
        assert "Validation accuracy" in card and f"{100 * info['validation_accuracy']:.1f}%" in card
        assert all(c in card for c in clf.classes_)
        assert "Error" not in browser.find_element(By.ID, "status").text

        logs = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
        assert logs == []  # no CSP violation, no failed request, no script error
        out = Path(os.environ.get("XMODAL_SCREENSHOT") or tmp_path / "serve-page.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(out)) and out.stat().st_size > 10_000
