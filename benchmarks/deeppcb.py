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
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = 0.2  # fraction of trainval held out (by a hash of the image name): 195 of the 1,000 pairs


def data_root() -> Path:
    base = Path(os.environ.get("DEFECTOPS_DEEPPCB") or REPO.parent / "shared" / "datasets" / "deeppcb")
    return base / "PCBData" if (base / "PCBData").is_dir() else base


def decode_baseline(pairs: list[tuple[str, Path, Path]]) -> float:
    from concurrent.futures import ThreadPoolExecutor

    from training.candidates import read_pair

    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda p: read_pair(p[1], p[2]), pairs))
    return len(pairs) / (time.perf_counter() - t0)


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from pipelines.config import load_config
    from pipelines.fsutil import read_json
    from pipelines.runner import run_pipeline
    from serving.model_ref import resolve
    from serving.predict import predict_boards, read_board_list
    from training.snapshot import load_snapshot

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--home", type=Path, help="DefectOps home to use (default: a temporary one)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    root = data_root()
    home = args.home or Path(tempfile.mkdtemp(prefix="defectops-deeppcb-"))
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
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
