"""DeepPCB end to end: train with `+experiment=deeppcb`, then detect on the held-out part of our trainval split.

Prints the DeepPCB mAP and F-score (IoU > 0.33) on the held-out part, end-to-end images/s of `predict boards`
(decode, candidates, classification through onnxruntime with the served model, 2 threads), the training wall time,
and the candidate recall ceiling (the fraction of ground-truth boxes any candidate can match, which bounds recall).
The baseline run in the same process is decoding alone (reading both images of every pair): the ratio says what
detection costs on top of I/O.

    .venv/bin/python benchmarks/deeppcb.py                  # data: $DEFECTOPS_DEEPPCB or ../shared/datasets/deeppcb
    .venv/bin/python benchmarks/deeppcb.py --home /tmp/dp   # keep (and resume) the run in that home
    .venv/bin/python benchmarks/deeppcb.py train.epochs=8   # overrides for the experiment

The held-out part is the 20 % of trainval that ``data.split.test=0.2`` (added by default, before your overrides) sets
aside; ``+experiment=deeppcb`` alone sets aside only 5 % and trains on more pairs, so its own test part is too small to
report on. Nothing is trained, tuned or selected on the held-out part.

That part is a random split: its boards come from the designs the model trained on, which flatters (two thirds of
DeepPCB's published test pairs come from designs that are not in trainval). ``--leave-design-out`` adds one run per
board design (``groupNNNNN``) with that design as the test split (``data.split.group_by=design``,
``data.split.test_groups=[design]``; val, which selects the epoch and the score threshold, is other whole designs) and
reports each design's mAP and F-score with bootstrap intervals over its boards, their mean and the worst design:

    .venv/bin/python benchmarks/deeppcb.py --leave-design-out                          # every design
    .venv/bin/python benchmarks/deeppcb.py --leave-design-out group44000,group77000 --ldo-only train.epochs=10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
HELD_OUT = 0.2  # fraction of trainval held out (by a hash of the image name): 195 of the 1,000 pairs


def data_root() -> Path:
    base = Path(os.environ.get("DEFECTOPS_DEEPPCB") or REPO.parent / "shared" / "datasets" / "deeppcb")
    return base / "PCBData" if (base / "PCBData").is_dir() else base


def decode_baseline(pairs: list[tuple[str, Path, Path]]) -> float:
    from concurrent.futures import ThreadPoolExecutor

    from defectops.training.candidates import read_pair

    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda p: read_pair(p[1], p[2]), pairs))
    return len(pairs) / (time.perf_counter() - t0)


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from defectops.core.fsutil import read_json
    from defectops.pipelines.config import load_config
    from defectops.pipelines.runners.local import run_pipeline
    from defectops.serving.model_ref import resolve
    from defectops.serving.predict import predict_boards, read_board_list
    from defectops.training.snapshot import load_snapshot

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--home", type=Path, help="DefectOps home to use (default: a temporary one)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--leave-design-out", nargs="?", const="all", default=None, metavar="DESIGNS",
                    help="also run leave-design-out folds: 'all' or comma-separated designs (groupNNNNN)")
    ap.add_argument("--ldo-only", action="store_true", help="only the leave-design-out folds, not the random split")
    args = ap.parse_args()
    root = data_root()
    home = args.home or Path(tempfile.mkdtemp(prefix="defectops-deeppcb-"))
    if args.ldo_only:
        if not args.leave_design_out:
            ap.error("--ldo-only needs --leave-design-out")
        out = {"leave_design_out": leave_design_out(root, home, args.leave_design_out, args.overrides)}
        print(json.dumps(out, indent=2))
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        return 0
    cfg = load_config(["+experiment=deeppcb", f"data.root={root}", f"data.split.test={HELD_OUT}", *args.overrides])
    t0 = time.perf_counter()
    ctx, outcomes = run_pipeline(cfg, home=home)
    run_seconds = time.perf_counter() - t0
    steps = {o.name: o.seconds for o in outcomes}
    train_seconds = read_json(ctx.root / "steps" / "train.json")["seconds"]

    snap = load_snapshot(ctx.root / "data" / "snapshot")
    held_out = [s for s in snap.samples if s["split"] == "test"]
    list_file = ctx.root / "eval" / "held_out.txt"
    list_file.write_text("".join(f"{s['path'].removesuffix('_test.jpg')}.jpg {s['annotation']}\n" for s in held_out))
    model = resolve(str(ctx.root), tracking_uri="", cache_dir=home / "cache")  # the served model (INT8 if verified)
    pairs, _ = read_board_list(root, list_file)
    baseline = decode_baseline(pairs)
    r = predict_boards(model, root, list_file, ctx.root / "eval" / "held_out_results")
    validate = read_json(ctx.root / "steps" / "validate_data.json")["result"]
    board = read_json(ctx.root / "board_metrics.json")
    out = {
        "held_out_boards": r.images, "map": r.score.map if r.score else None,
        "fscore": r.score.fscore if r.score else None, "precision": r.score.precision if r.score else None,
        "recall": r.score.recall if r.score else None, "images_per_s": r.images_per_s,
        "decode_only_images_per_s": baseline, "train_seconds": train_seconds, "run_seconds": run_seconds,
        "candidate_recall_ceiling": board.get("test", {}).get("ceiling_recall"),
        "candidate_recall_loose": validate.get("candidate_recall_overall"),
        "score_threshold": board.get("score_threshold"), "steps": steps, "served_model": model.source,
        "val": {k: board.get("val", {}).get(k) for k in ("map", "fscore", "ceiling_recall")},
    }
    t = Table(title=f"DeepPCB held-out part ({r.images} boards of trainval, never trained or tuned on)")
    for col in ("mAP", "F-score", "images/s", "x decode-only", "train s", "ceiling recall@0.33"):
        t.add_column(col, justify="right")
    t.add_row(f"{out['map']:.4f}", f"{out['fscore']:.4f}", f"{r.images_per_s:.1f}", f"{r.images_per_s / baseline:.2f}",
              f"{train_seconds:.0f}", f"{out['candidate_recall_ceiling']:.4f}")
    Console().print(t)
    if args.leave_design_out:
        out["leave_design_out"] = leave_design_out(root, home, args.leave_design_out, args.overrides)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


def designs_of(root: Path) -> list[str]:
    return sorted({line.split("/", 1)[0] for line in (root / "trainval.txt").read_text().splitlines() if line.strip()})


def leave_design_out(root: Path, home: Path, which: str, overrides: list[str]) -> dict[str, Any]:
    """One run per held-out design (its boards are the test split, never trained or tuned on), up to the evaluate
    step: the board figures are the evaluate step's (PyTorch model, score threshold chosen on the val designs)."""
    from bench_run import reference_seconds
    from rich.console import Console
    from rich.table import Table

    from defectops.core.fsutil import read_json
    from defectops.pipelines.config import load_config
    from defectops.pipelines.dag import DAG
    from defectops.pipelines.runners.local import RunError, prepare_run_root, run_step

    designs = designs_of(root) if which == "all" else which.split(",")
    reference = reference_seconds()
    folds = []
    for design in designs:
        cfg = load_config(["+experiment=deeppcb", f"data.root={root}", "data.split.group_by=design",
                           f"data.split.test_groups=[{design}]", "data.split.test=0.0", "gates.min_board_map=0.0",
                           "gates.min_board_fscore=0.0", *overrides])
        t0 = time.perf_counter()
        ctx = prepare_run_root(cfg, home)
        run_root = ctx.root
        for step in DAG[: [s.name for s in DAG].index("evaluate") + 1]:
            try:
                run_step(step, ctx, cfg)
            except RunError as e:  # a failed gate still leaves the evaluation behind
                if not (e.gate_failure and (run_root / "board_metrics.json").is_file()):
                    raise
        board = read_json(run_root / "board_metrics.json")
        train_seconds = read_json(run_root / "steps" / "train.json")["seconds"]
        splits = read_json(run_root / "steps" / "pull_data.json")["result"].get("groups", {})
        test = board["test"]
        folds.append({"design": design, "boards": test["boards"], "map": test["map"], "fscore": test["fscore"],
                      "intervals": test.get("intervals", {}), "val": {k: board["val"][k] for k in ("map", "fscore")},
                      "val_designs": sorted(splits.get("val", {})), "train_designs": sorted(splits.get("train", {})),
                      "score_threshold": board["score_threshold"],
                      "type_thresholds": board.get("type_thresholds", {}), "images_per_s": test.get("images_per_s"),
                      "train_seconds": train_seconds,
                      "train_x_reference": train_seconds / reference, "run_seconds": time.perf_counter() - t0})
    t = Table(title="DeepPCB leave-design-out: each design held out in turn (bootstrap 95 % over its boards)")
    for col in ("held-out design", "boards", "mAP", "F-score", "val designs", "val mAP / F", "thresholds",
                "boards/s (evaluate)", "train s (x reference)"):
        t.add_column(col, justify="right")
    for f in folds:
        iv = f["intervals"]
        per = "".join(f", {k} {v}" for k, v in f["type_thresholds"].items())
        t.add_row(f["design"], str(f["boards"]), _with_interval(f["map"], iv.get("map")),
                  _with_interval(f["fscore"], iv.get("fscore")), ",".join(f["val_designs"]),
                  f"{f['val']['map']:.4f} / {f['val']['fscore']:.4f}", f"{f['score_threshold']}{per}",
                  f"{f['images_per_s']:.1f}" if f["images_per_s"] else "-",
                  f"{f['train_seconds']:.0f} ({f['train_x_reference']:.0f}x)")
    maps, fs = [f["map"] for f in folds], [f["fscore"] for f in folds]
    worst = min(folds, key=lambda f: f["fscore"])
    t.add_row("mean", str(sum(f["boards"] for f in folds)), f"{sum(maps) / len(maps):.4f}", f"{sum(fs) / len(fs):.4f}",
              "", "", "", "", "")
    t.add_row(f"worst ({worst['design']})", str(worst["boards"]), f"{worst['map']:.4f}", f"{worst['fscore']:.4f}",
              "", "", "", "", "")
    Console(width=max(Console().width, 160)).print(t)
    return {"folds": folds, "mean_map": sum(maps) / len(maps), "mean_fscore": sum(fs) / len(fs),
            "worst_design": worst["design"], "worst_map": min(maps), "worst_fscore": min(fs),
            "reference_s": reference}


def _with_interval(point: float, interval: dict[str, Any] | None) -> str:
    if not interval or interval.get("low") is None:
        return f"{point:.4f}"
    return f"{point:.4f} [{interval['low']:.4f}, {interval['high']:.4f}]"


if __name__ == "__main__":
    raise SystemExit(main())
