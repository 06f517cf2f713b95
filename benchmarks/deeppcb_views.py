"""Views and thresholds of the DeepPCB detector, compared on finished runs without retraining.

For each run root given (a `defectops run +experiment=deeppcb` or a `benchmarks/deeppcb.py` fold, evaluated), the
trained checkpoint classifies every val and test board's candidates under the four quarter turns once; then each
combination of

- views: ``one`` (the crop itself, `model.tta=none`) or ``rot4`` (mean of the four turns' probabilities), and
- thresholds: ``common`` (one score threshold) or ``per-type`` (`detect.threshold_per_type`: then one per type),

chooses its thresholds on that run's val split (the pipeline's own search, :func:`serving.detector.select_thresholds`,
objective ``detect.select``) and is scored on its test split with the DeepPCB metric. PyTorch FP32 on CPU; the
candidates and crops are the pipeline's. A leave-design-out fold (its test split one unseen design) says what
happens on a new design; the random split of `benchmarks/deeppcb.py` what happens on known ones.

    .venv/bin/python benchmarks/deeppcb_views.py /tmp/dp/home/runs/deeppcb-*     # one row per run and combination
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from defectops.core.fsutil import read_json
from defectops.core.layout import RUN
from defectops.evaluation.deeppcb import score
from defectops.serving.board_eval import board_split, detector_settings
from defectops.serving.config import DetectConfig
from defectops.serving.detector import (
    SELECT_OBJECTIVES,
    THRESHOLD_GRID,
    BoardDetector,
    detections_from_probs,
    select_thresholds,
)
from defectops.training.config import DataConfig
from defectops.training.models.classifier import _view
from defectops.training.snapshot import load_snapshot
from defectops.training.trainer import load_trained_model


def view_probs(run: Path) -> dict[str, Any]:
    """Candidates of every val/test board of ``run`` with their class probabilities under each quarter turn."""
    model, state = load_trained_model(run / RUN.model)
    cfg = OmegaConf.load(run / RUN.config)
    data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg.data))
    detect = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DetectConfig), cfg.detect))
    settings = detector_settings(tuple(state["classes"]), data.good_class, data.candidates, detect)  # type: ignore[union-attr,arg-type]
    captured: list[np.ndarray] = []

    def logits(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(x)
            v = np.stack([torch.softmax(model.forward_single(_view(t, k, False)), 1).numpy() for k in range(4)], 1)
        captured.append(v)
        return np.log(v.mean(1))

    snap = load_snapshot(run / RUN.snapshot)
    quarantined = {q["index"] for q in read_json(run / RUN.validation)["quarantined"]}
    out: dict[str, Any] = {"settings": settings, "detect": detect}
    for split in ("val", "test"):
        boards = board_split(snap, quarantined, split)
        pairs, gts = boards.pairs, boards.truths
        captured.clear()
        results = list(BoardDetector(logits, settings, threads=2).run(pairs))
        views = np.concatenate(captured) if captured else np.zeros((0, 4, len(settings.classes)), np.float32)
        rows, k = [], 0
        for r in results:
            rows.append((r, views[k:k + len(r.candidates)], gts[r.key]))
            k += len(r.candidates)
        out[split] = rows
    return out


def compare(cache: dict[str, Any]) -> list[dict[str, Any]]:
    s, detect = cache["settings"], cache["detect"]
    objective = SELECT_OBJECTIVES[detect.select]
    types = [c for c in s.classes if c != s.good_class]
    rows = []
    for views in ("one", "rot4"):
        def score_at(split: str, t: float, per: dict[str, float], views: str = views) -> Any:
            images = {}
            for r, v, gt in cache[split]:
                p = v[:, 0] if views == "one" else v.mean(1)
                images[r.key] = (gt, detections_from_probs(r.candidates, p, s, r.shape, t, per))
            return score(images, iou_threshold=detect.iou_threshold)

        for per_type in (False, True):
            t, per = select_thresholds(lambda t, p: objective(score_at("val", t, p)), types, grid=THRESHOLD_GRID,
                                       per_type=per_type)
            sc = score_at("test", t, per)
            rows.append({"views": views, "thresholds": "per-type" if per_type else "common", "threshold": t,
                         "type_thresholds": per, "test_map": sc.map, "test_fscore": sc.fscore,
                         "test_precision": sc.precision, "test_recall": sc.recall,
                         "test_boards": len(cache["test"])})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="evaluated run roots")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(2)
    table = Table(title="DeepPCB detector: views x thresholds (chosen on each run's val, scored on its test)")
    for col in ("run (test designs)", "views", "thresholds", "threshold", "test mAP", "test F", "P / R"):
        table.add_column(col, justify="left" if col in ("run (test designs)", "views", "thresholds") else "right")
    out = {}
    for run in a.runs:
        rows = compare(view_probs(run))
        designs = sorted(json.loads((run / "board_metrics.json").read_text())["test"].get("per_group", {}))
        label = f"{run.name} ({', '.join(designs) if len(designs) < 3 else f'{len(designs)} designs'})"
        for r in rows:
            thr = f"{r['threshold']}" + (f" +{len(r['type_thresholds'])} types" if r["type_thresholds"] else "")
            table.add_row(label, r["views"], r["thresholds"], thr, f"{r['test_map']:.4f}", f"{r['test_fscore']:.4f}",
                          f"{r['test_precision']:.3f} / {r['test_recall']:.3f}")
        out[run.name] = {"test_designs": designs, "rows": rows}
    console = Console(width=max(Console().width, 140))
    console.print(table)
    if len(out) > 1:
        agg = Table(title=f"over the {len(out)} runs: mean and worst")
        for col in ("views", "thresholds", "mean mAP", "mean F", "worst mAP", "worst F"):
            agg.add_column(col, justify="left" if col in ("views", "thresholds") else "right")
        for i, r0 in enumerate(next(iter(out.values()))["rows"]):
            rs = [v["rows"][i] for v in out.values()]
            maps, fs = [r["test_map"] for r in rs], [r["test_fscore"] for r in rs]
            agg.add_row(r0["views"], r0["thresholds"], f"{np.mean(maps):.4f}", f"{np.mean(fs):.4f}",
                        f"{min(maps):.4f}", f"{min(fs):.4f}")
        console.print(agg)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
