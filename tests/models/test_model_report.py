"""The version's HTML report: every section from the run's own files, self-contained, and whole in a real browser.

Built from tests/fake_training.py's train result (real files: plots, comparison, predictions) with a
calibration fitted by the real code and Grad-CAM overlays of its region model; the README walk
(tests/test_readme.py) checks the report of a real retrain, logged and linked.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tasks.common.results import Explanation, Promotion
from tasks.models.model_report import REPORT_ARTIFACT, render_report, write_report
from tests.fake_training import fake_prepare_summary, fake_train_result, region_model

SECTIONS = ("lineage", "gate", "metrics", "plots", "calibration", "candidates", "mistakes", "audit")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A trained result with calibration and explained mistakes, its data summary and a gate decision."""
    from tasks.learning.calibration import calibrate, on_test_split
    from tasks.learning.gradcam import explain_files
    from tests.fake_training import region_pixels
    from PIL import Image

    root = tmp_path_factory.mktemp("report")
    trained = fake_train_result(root / "train")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    calibration = calibrate(labels, np.clip(labels * 0.98 + rng.normal(0, 0.3, 200), 0.001, 0.999))
    calibration = on_test_split(calibration, Path(trained.predictions_path), root / "train" / "plots" / "rel.png")
    sources = []
    for index, label in enumerate(["dog", "cat"]):
        path = root / "images" / f"{label} <img src=x>.png"  # a file name that is text, never markup
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(region_pixels(label, index)).save(path)
        sources.append(path)
    rows = explain_files(region_model(), sources, root / "train" / "plots" / "gradcam")
    explanations = [Explanation(path=str(path), label="cat" if row["predicted"] == "dog" else "dog",
                                predicted=row["predicted"], probability=row["probability"], overlay=row["overlay"])
                    for path, row in zip(sources, rows)]
    trained = trained.model_copy(update={"calibration": calibration, "explanations": explanations, "tta": "flip",
                                         "data_dir": str(root / "data")})
    data = fake_prepare_summary(root / "data")
    decision = Promotion(version="7", model_name="cats-vs-dogs", model_uri="models:/cats-vs-dogs/7", alias="champion",
                         promoted=True, reasons=["roc_auc 0.9700 beats the champion's 0.9500 by the margin"],
                         metric="roc_auc", candidate_value=0.97, champion_value=0.95,
                         champion_metrics={"roc_auc": 0.95, "accuracy": 0.85, "log_loss": 0.4},
                         previous_champion_version="6")
    served = {"roc_auc": 0.97, "accuracy": 0.9, "log_loss": 0.3, "f1_cat": 0.9, "f1_dog": 0.9, "n_images": 8.0}
    return root, data, trained, served, decision


def test_every_section_is_filled_from_the_runs_files(parts):
    root, data, trained, served, decision = parts
    html = render_report(data, trained, served, decision, None, "pets.zip")
    for section in SECTIONS:
        body = re.search(rf'<section id="{section}">(.*?)</section>', html, flags=re.S)
        assert body and len(re.sub(r"<[^>]+>|\s", "", body.group(1))) > 20, section
    assert 'class="missing"' not in html
    assert "f" * 64 in html and "pets.zip" in html and "c" * 64 in html  # lineage: fingerprint, source, config hash
    assert "0.9500" in html and "version 6" in html  # the champion beside this model, on the same test split
    assert html.count("data:image/png;base64,") == 5  # confusion, ROC, reliability, two Grad-CAM overlays
    assert "dog &lt;img src=x&gt;.png" in html and "<img src=x>" not in html  # text stays text
    assert "No audit" in html


def test_the_data_audit_is_shown_where_the_run_has_one(parts, tmp_path):
    from tasks.common.results import QualitySummary

    root, data, trained, served, decision = parts
    findings = tmp_path / "audit.csv"
    findings.write_text("path,split,given_label,suggested_label,score,kind\n"
                        "arranged/train/cats/a.jpg,train,cat,dog,0.93,label_issue\n"
                        "arranged/test/dogs/b.jpg,test,dog,dog,0.51,near_duplicate\n")
    quality = QualitySummary(feature_space="vgg16-random-32-float32-tensorflow-pillow", report=str(tmp_path / "a.pq"),
                             csv=str(findings), images=40, label_issues=1, near_duplicates=1, leaked_test_images=1,
                             leaked_validation_images=0, outliers=0, folds=5, warnings=["2.5% suspected labels"],
                             checks=str(tmp_path / "checks.json"), reused=False)
    chosen = trained.backbones[trained.chosen_backbone].model_copy(update={"quality": quality})
    audited = trained.model_copy(update={"backbones": {**trained.backbones, trained.chosen_backbone: chosen}})
    html = render_report(data, audited, served, decision, None, "pets.zip")
    assert "1 suspected label(s), 1 near-duplicate pair(s) (1 test and 0 validation image(s) near a training image)" \
        in html and "arranged/train/cats/a.jpg" in html and "Warning: 2.5% suspected labels" in html


def open_in_chromium(page_path: Path) -> dict:
    """Open a file in Debian's headless Chromium through Playwright: its images, sections, requests and a screenshot.

    Every request is recorded, and any that would leave the file (not `file:` or `data:`) is aborted.
    """
    from io import BytesIO

    from PIL import Image
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "the browser test needs Debian's chromium (the README's test command installs it)"
    requested: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.route("**/*", lambda route: (requested.append(route.request.url),
                                              route.continue_() if route.request.url.startswith(("file:", "data:"))
                                              else route.abort()))
            page.on("request", lambda request: requested.append(request.url))
            page.goto(page_path.as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(image => [image.complete, image.naturalWidth])")
            sections = page.evaluate("Array.from(document.querySelectorAll('section')).map(s => s.id)")
            screenshot = page.screenshot(full_page=True)
        finally:
            browser.close()
    shot = np.asarray(Image.open(BytesIO(screenshot)).convert("L"), dtype=np.float64)
    return {"images": images, "sections": sections, "left_the_file": {url for url in requested
                                                                      if url != page_path.as_uri()
                                                                      and not url.startswith("data:")},
            "shot": shot}


def assert_opens_whole(page_path: Path, images: int) -> None:
    """The page renders (a long screenshot with contrast), every image decodes, every section is there, nothing leaves."""
    opened = open_in_chromium(page_path)
    assert len(opened["images"]) == images and all(done and width > 0 for done, width in opened["images"]), opened
    assert opened["sections"] == list(SECTIONS) and not opened["left_the_file"], opened
    assert opened["shot"].shape[0] > 900 and opened["shot"].std() > 10  # text and figures, not a blank page


def test_the_report_opens_whole_in_a_real_browser_and_requests_nothing(parts, tmp_path):
    """Chromium renders it, every image decodes, and nothing but the file itself is requested."""
    root, data, trained, served, decision = parts
    assert_opens_whole(write_report(tmp_path / REPORT_ARTIFACT, data, trained, served, decision, None, "pets.zip"), 5)


@pytest.mark.filterwarnings("ignore:Logger .prefect.task_runs. attempted to send logs")
def test_a_report_that_cannot_be_written_is_one_warning_and_the_version_stands(parts, tmp_path):
    """The version is registered and gated before its report: a report the disk refuses must not fail the retrain
    (flows/retrain.py reads publish_report's final state through report_or_warning)."""
    from tasks.models.steps import publish_report, report_or_warning

    root, data, trained, served, decision = parts
    blocked = tmp_path / "run"
    blocked.mkdir()
    (blocked / "report").write_text("a file where the report's folder goes")  # a real fault: mkdir fails
    state = publish_report.with_options(retries=0)(data, trained.model_copy(update={"output_dir": str(blocked)}),
                                                   served, decision, None, "pets.zip", return_state=True)
    assert state.is_failed()
    said: list[logging.LogRecord] = []
    listener = logging.Handler()
    listener.emit = said.append  # type: ignore[method-assign]
    logging.getLogger("tasks.models.steps").addHandler(listener)  # outside a flow run: run_logger's own logger
    try:
        assert report_or_warning(state, decision) == (None, None)
    finally:
        logging.getLogger("tasks.models.steps").removeHandler(listener)
    [line] = [record.getMessage() for record in said if record.levelno == logging.WARNING]
    assert line.startswith("Version 7 is registered, but its report could not be written (") and "\n" not in line
    assert (blocked / "report").read_text().startswith("a file")  # nothing half-written in its place
