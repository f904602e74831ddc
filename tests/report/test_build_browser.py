"""The report opens in headless Chromium with no console error and every section rendered; run strings stay text.

Point it at a real run (the report is written to the test's tmp dir, the run is only read):
    REFUSALSCOPE_REPORT_RUN=runs/default REFUSALSCOPE_ARTIFACTS=artifacts \
        python -m pytest -q tests/report/test_build_browser.py -k real
"""

import os
from pathlib import Path

import pytest

from helpers import INJECT_IMG, INJECT_SCRIPT, artifact_dir
from refusalscope.annotate.store import AnnotationStore
from refusalscope.config import ReportSettings
from refusalscope.report.build import build_report

SECTIONS = ["run", "saes", "direction", "stage1", "stage2", "stage3", "hydra", "controls", "ce", "clamp", "taxonomy",
            "explain", "annotation", "prompts"]


def _open_and_check(chromium: str, report: Path, shots: Path, prefix: str) -> tuple[dict, str]:
    """Open the report, check it renders cleanly; returns ({section: status}, the page's whole text)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        problems = []
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
                else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("request", lambda r: problems.append(f"request: {r.url}") if not r.url.startswith(("file:", "data:"))
                else None)
        page.goto(report.resolve().as_uri())
        page.wait_for_load_state("load")
        page.screenshot(path=str(shots / f"{prefix}-top.png"))
        status = {}
        for section in page.locator("main > section").all():
            key = section.get_attribute("id")
            status[key] = section.get_attribute("data-status")
            assert section.locator("h2").is_visible(), key
            if status[key] == "missing":
                assert section.locator("p.missing").inner_text().startswith("not in this run: run `refusalscope")
            else:
                assert section.locator("table, dl, figure, details, p").count() > 1, key
            section.scroll_into_view_if_needed()
            section.screenshot(path=str(shots / f"{prefix}-{key}.png"))
        images = page.locator("img")
        for i in range(images.count()):  # every embedded figure decodes
            assert images.nth(i).evaluate("img => img.complete && img.naturalWidth > 0"), images.nth(i).get_attribute(
                "alt")
        assert page.locator("script").count() == 0 and page.locator("[onerror]").count() == 0
        assert page.evaluate("window.__pwned") is None
        text = page.locator("body").text_content()
        browser.close()
    assert not problems, problems
    return status, text


@pytest.mark.timeout(300)
def test_report_in_chromium(analysed_run, chromium, tmp_path):
    run, _, info = analysed_run
    store = AnnotationStore(run / "annotations.sqlite")
    items = [(f, "pipeline") for f in sorted(info["labels"])[:3]]
    store.initialise(items, ["wildchats", "misinformation"], {"seed": 0, "order": "shared"})
    for name in ("a", "b", "c"):
        store.register(name)
        for f, _ in items:
            store.submit(name, f, store.token(name, f), ["wildchats"], False)
    path, _ = build_report(ReportSettings(run=run))
    status, text = _open_and_check(chromium, path, artifact_dir(tmp_path), "report-fixture")
    assert status == {k: "present" for k in SECTIONS}
    assert INJECT_SCRIPT in text and INJECT_IMG in text  # shown as text, not markup


@pytest.mark.timeout(600)
def test_report_of_a_real_run_in_chromium(chromium, tmp_path):
    real = os.environ.get("REFUSALSCOPE_REPORT_RUN")
    if not real:
        pytest.skip("set REFUSALSCOPE_REPORT_RUN=RUN_DIR to check the report of a real run")
    path, sections = build_report(ReportSettings(run=Path(real), out=tmp_path / "report.html"))
    status, _ = _open_and_check(chromium, path, artifact_dir(tmp_path), "report-real")
    assert list(status) == SECTIONS
    assert not [s.notes for s in sections if s.notes]
