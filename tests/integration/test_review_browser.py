"""The review page in a real browser: headless Chromium (Debian's ``/usr/bin/chromium``) driven by Playwright.

Scenario: an ML engineer signs in and can look but not decide; a quality lead (not the person who registered the
candidate) opens it, sees the evidence (gate table, per-class table, confusion matrices, Grad-CAM tiles), approves
it with a reason, sees the new champion, and finds the decision in the verified history. Also: every page fits a
1366 px wide laptop screen. Full-page screenshots go to the test's tmp dir and to ``test-artifacts/review/``.
The Playwright browser download is never used (it cannot work here): CI installs Debian's chromium.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from review_support import PASSWORDS, ReviewServer

from defectops.registry.mlflow_registry import client as make_client

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
from repo_paths import REPO  # noqa: E402


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (`apt-get install chromium`; .ci/run does it). "
                    "Do not run `playwright install`: its browser download does not work here.", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``shot(page, name)``: a full-page screenshot in the tmp dir, copied to test-artifacts/review/ at the end."""
    folder = tmp_path_factory.mktemp("review-screenshots")

    def shot(page: Any, name: str) -> Path:
        path = folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    yield shot
    out = REPO / "test-artifacts" / "review"
    out.mkdir(parents=True, exist_ok=True)
    for png in folder.glob("*.png"):
        shutil.copy2(png, out / png.name)


def _page(browser: Any, errors: list[str]) -> Any:
    ctx = browser.new_context(viewport={"width": 1366, "height": 768})
    page = ctx.new_page()
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page


def _sign_in(page: Any, url: str, name: str, path: str = "/") -> None:
    page.goto(url + path)
    assert "/login" in page.url  # anonymous: sent to the sign-in page
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORDS[name])
    page.click("button[type=submit]")
    page.wait_for_load_state()
    assert "/login" not in page.url


def test_pages_fit_a_laptop_screen(browser: Any, review_server: ReviewServer, shots: Any) -> None:
    reg, errors = review_server.registry, []
    page = _page(browser, errors)
    _sign_in(page, review_server.url, "quinn")
    for path in ("/", f"/models/{reg['model']}/versions/{reg['challenger']}", f"/models/{reg['model']}/history",
                 f"/models/{reg['model']}/versions/{reg['champion']}"):
        page.goto(review_server.url + path)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 1366, f"{path} is {width} px wide at a 1366 px viewport"
    page.context.close()
    assert errors == []  # no CSP violation, no script error


def test_engineer_looks_and_quality_lead_approves(browser: Any, review_server: ReviewServer, shots: Any) -> None:
    reg, url, errors = review_server.registry, review_server.url, []
    candidate = f"/models/{reg['model']}/versions/{reg['challenger']}"

    eng = _page(browser, errors)
    _sign_in(eng, url, "eng")
    assert eng.get_by_test_id("champion").first.inner_text() == f"version {reg['champion']}"
    shots(eng, "01-queue-ml-engineer")
    eng.click(f"text=Review version {reg['challenger']}")
    eng.wait_for_load_state()
    assert eng.url.endswith(candidate)
    assert eng.get_by_test_id("no-decision").is_visible()
    assert eng.locator("button.approve").count() == 0
    shots(eng, "02-candidate-ml-engineer")
    eng.context.close()

    lead = _page(browser, errors)
    _sign_in(lead, url, "quinn", candidate)
    assert lead.url.endswith(candidate)  # back where the sign-in started
    gates = lead.get_by_test_id("gates").locator("tbody tr")
    assert gates.count() >= 3
    assert "macro_recall" in gates.first.inner_text()
    per_class = lead.get_by_test_id("per-class").inner_text()
    for cls in reg["metrics"]["classes"]:
        assert cls in per_class
    assert lead.locator("table.cm").count() == 2  # candidate and champion
    tiles = lead.locator(".tile img")
    assert tiles.count() > 0
    assert lead.evaluate("Array.from(document.querySelectorAll('.tile img')).every(i => i.naturalWidth > 0)")
    assert lead.get_by_test_id("counts").is_visible()  # sample counts per split and class
    assert "dataset_fingerprint" in lead.locator("#training").inner_text()
    shots(lead, "03-candidate-quality-lead")

    lead.fill("textarea[name=reason]", "better recall on every defect class; line 4 trial OK")
    lead.click("button.approve")
    lead.wait_for_load_state()
    assert lead.url.endswith(candidate)
    assert "it is now the champion" in lead.get_by_role("status").inner_text()
    assert lead.get_by_test_id("champion").inner_text() == f"version {reg['challenger']}"
    shots(lead, "04-approved")
    c = make_client(reg["uri"])
    assert str(c.get_model_version_by_alias(reg["model"], "champion").version) == reg["challenger"]

    lead.click("text=decision history")
    lead.wait_for_load_state()
    assert "Audit trail verified" in lead.get_by_test_id("verify").inner_text()
    newest = lead.locator("table.history tbody tr").first.inner_text()
    for text in ("approve", "quinn", "quality-lead", "line 4 trial OK"):
        assert text in newest
    shots(lead, "05-history")
    lead.goto(url + "/")
    assert lead.get_by_test_id("champion").first.inner_text() == f"version {reg['challenger']}"
    assert "No candidate is waiting" in lead.inner_text("main")
    shots(lead, "06-queue-after")
    lead.context.close()
    assert errors == []
