"""Evidence for the review page: the miss tiles the evaluate step writes, and what the register step logs."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
from review_support import Client, ReviewServer, make_review_registry
from tiny import TinyRun

from defectops.evaluation.gates import GateConfig, evaluate_gates
from defectops.evaluation.intervals import ClassificationIntervals
from defectops.evaluation.metrics import classification_metrics, pr_curves
from defectops.evaluation.report import Miss, miss_png, render_report, write_miss_tiles
from defectops.registry.config import RegistryConfig
from defectops.registry.mlflow_registry import client as make_client
from defectops.registry.review.evidence import candidate_view


def test_miss_tiles_are_the_report_gallery(tmp_path: Path) -> None:
    classes = ["false_call", "a<b", "short"]
    y = np.array([0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[[0, 2, 2, 1, 1, 2]] * 0.8 + 0.2 / 3
    metrics = classification_metrics(y, probs, classes, "false_call")
    img = np.zeros((20, 20, 3), np.uint8)
    img[5:10, 5:10] = 255
    misses = [Miss(img, "a<b", "short", 0.75, caption="cam & crop"), Miss(img[:, :, 0], "false_call", "a<b", 0.5)]
    html = render_report(tmp_path / "r.html", title="t", metrics=metrics, gates=evaluate_gates(metrics, GateConfig()),
                         curves=pr_curves(y, probs, classes), info={}, misses=misses).read_text(encoding="utf-8")
    out = write_miss_tiles(tmp_path / "misses", misses)
    index = json.loads((out / "index.json").read_text())
    assert [(t["true_label"], t["predicted"], t["confidence"], t["caption"]) for t in index] == [
        ("a<b", "short", 0.75, "cam & crop"), ("false_call", "a<b", 0.5, "")]
    for t, m in zip(index, misses, strict=True):
        png = (out / t["file"]).read_bytes()
        assert png.startswith(b"\x89PNG") and png == miss_png(m)
        assert base64.b64encode(png).decode("ascii") in html  # the same image the report shows
    write_miss_tiles(out, misses[:1])  # rewritten as a whole: no stale tile survives
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "miss-00.png"]


def test_register_logs_review_evidence(tiny_run: TinyRun) -> None:
    root = Path(tiny_run.root)
    index = json.loads((root / "register" / "evidence" / "misses" / "index.json").read_text())
    assert index == json.loads((root / "eval" / "misses" / "index.json").read_text()) and len(index) > 0
    dataset = json.loads((root / "register" / "evidence" / "dataset.json").read_text())
    assert set(dataset["crops_per_split"]) == {"train", "val", "test"}
    c = make_client(f"sqlite:///{Path(tiny_run.home) / 'mlflow.db'}")
    run = c.get_model_version(tiny_run.cfg.registry.model_name, "1").run_id
    logged = {a.path for a in c.list_artifacts(run, "evidence")}
    assert {"evidence/dataset.json", "evidence/misses", "evidence/gates.json", "evidence/report.html"} <= logged
    assert len(c.list_artifacts(run, "evidence/misses")) == len(index) + 1


def test_review_page_shows_intervals_of_candidate_and_champion(tiny_run: TinyRun, tmp_path: Path) -> None:
    # the champion (v1) was registered by the pipeline with an "intervals" entry; the challenger's metrics.json was
    # written without one (as by an older version) and gets Wilson intervals from its confusion matrix. A registry of
    # its own: the session's review_registry may already have its challenger approved by the browser tests.
    review_registry = make_review_registry(tiny_run, tmp_path)
    c = make_client(review_registry["uri"])
    v = candidate_view(c, review_registry["model"], review_registry["challenger"], RegistryConfig())
    rows = {r["key"]: r for r in v["summary"]}
    run = c.get_model_version(review_registry["model"], review_registry["champion"]).run_id
    champ = json.loads(Path(c.download_artifacts(run, "metrics.json")).read_text())
    logged = ClassificationIntervals.from_dict(champ["intervals"])
    assert logged.macro_recall is not None and logged.macro_recall.unit == "boards"
    assert rows["escape_rate"]["champ_interval"] == logged.escape_rate.format_bounds(4)
    assert rows["macro_recall"]["champ_interval"] == logged.macro_recall.format_bounds(4)
    mine = ClassificationIntervals.of_metrics_dict(review_registry["metrics"])
    assert mine is not None and mine.macro_recall is None
    assert rows["false_call_rate"]["interval"] == mine.false_call_rate.format_bounds(4)
    assert rows["macro_recall"]["interval"] is None  # no bootstrap for an old file
    for cls in v["classes"]:
        assert cls["recall_interval"] == mine.per_class_recall[cls["name"]].format_bounds(4) or (
            not mine.per_class_recall[cls["name"]].defined and cls["recall_interval"] is None)
    assert v["interval_note"] and "Wilson" in v["interval_note"]


def test_candidate_page_renders_the_intervals(review_server: ReviewServer) -> None:
    reg = review_server.registry
    c = Client(review_server.url)
    assert c.login("eng").status == 303
    page = c.get(f"/models/{reg['model']}/versions/{reg['challenger']}")
    assert page.status == 200
    mine = ClassificationIntervals.of_metrics_dict(reg["metrics"])
    assert mine is not None
    assert f'<span class="small muted interval">{mine.escape_rate.format_bounds(4)}</span>' in page.body
    assert 'data-testid="interval-note"' in page.body and "Wilson" in page.body
    champion = c.get(f"/models/{reg['model']}/versions/{reg['champion']}")  # the pipeline's own metrics.json
    assert champion.status == 200 and "percentile bootstrap over" in champion.body
