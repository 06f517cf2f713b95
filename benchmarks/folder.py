"""Folder-per-class defaults on real data: the old and the new `+experiment=folder` recipe side by side.

Two real folder datasets, built outside the repository (under ``--data-dir``, default a temporary folder):

- ``elpv``: the 2,624 solar-cell electroluminescence images of the ``elpv-dataset`` package (300x300 grey PNGs;
  ``pip install elpv-dataset``), as ``good/`` (defect probability < 0.5) and ``defect/`` (>= 0.5), split by the
  importer (content-hash groups: val 15 %, test 20 %). ``--levels 4`` keeps the four probability levels instead.
- ``deeppcb-crops``: AOI candidate crops of the real DeepPCB pairs (``$DEFECTOPS_DEEPPCB`` or
  ``../shared/datasets/deeppcb``), cut from the tested image at the candidate box's own size (so crop size depends on
  the class, as in a real crop export), one folder per type plus ``false_call``, with exact duplicates (3 % of the
  crops copied again under another name) and a few label conflicts (the same crop in two class folders). The split
  is by board design: ``train/`` holds the crops of three designs (group00041, group13000, group20085), ``val/``
  of group92000, ``test/`` of group44000, group50600 and group77000, designs the model never saw.
  ``--pairs-per-design N`` keeps the first N pairs of each design (a smaller, faster set).

Each recipe runs the steps `defectops run` runs up to `evaluate` (pull_data, validate_data, train, evaluate) in its
own home, and the held-out `test` figures are reported with Wilson 95 % intervals; nothing is selected on `test`.
The reference workload timed in the same process (one training pass of ResNet-10-T over fixed random crops) gives
the training time as a ratio that is comparable across machines.

    .venv/bin/python benchmarks/folder.py --dataset elpv                        # old vs new defaults
    .venv/bin/python benchmarks/folder.py --dataset deeppcb-crops --recipes new
    .venv/bin/python benchmarks/folder.py --dataset elpv --recipes new model.name=aoi_resnet10t   # + overrides
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

# The folder recipe before issue 13, spelled out so that it stays measurable after the defaults change.
RECIPES: dict[str, list[str]] = {
    "old": ["model.name=aoi_resnet10t", "model.pretrained=false", "data.candidates.crop_size=64",
            "data.fit_mode=letterbox", "train.epochs=10", "train.select=last", "train.lr=0.003",
            "train.batch_size=64", "train.augment.shift_px=3"],
    "new": [],  # whatever +experiment=folder says now
}
TEST_DESIGNS = ("group44000", "group50600", "group77000")
VAL_DESIGNS = ("group92000",)


def deeppcb_root() -> Path:
    base = Path(os.environ.get("DEFECTOPS_DEEPPCB") or REPO.parent / "shared" / "datasets" / "deeppcb")
    return base / "PCBData" if (base / "PCBData").is_dir() else base


def build_elpv(out: Path, levels: int) -> tuple[Path, str]:
    """Class folders of the ELPV images (copied: the importer refuses nothing, but never links into site-packages)."""
    import elpv_dataset

    src = Path(elpv_dataset.__file__).parent / "data"
    root = out / f"elpv-{levels}"
    if (root / ".complete").is_file():
        return root, "good"
    names = {0.0: "good", 1 / 3: "p033", 2 / 3: "p067", 1.0: "defect"}
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for line in (src / "labels.csv").read_text().splitlines():
        path, prob, _kind = line.split()
        p = float(prob)
        label = ("good" if p < 0.5 else "defect") if levels == 2 else names[min(names, key=lambda k: abs(k - p))]
        (tmp / label).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / path, tmp / label / Path(path).name)
    (tmp / ".complete").write_text("")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root, "good"


def build_deeppcb_crops(out: Path, dup_fraction: float = 0.03, conflicts: int = 6,
                        pairs_per_design: int = 0) -> tuple[Path, str]:
    """Candidate crops of DeepPCB at their own box size, split by design, with duplicates and label conflicts;
    ``pairs_per_design`` > 0 keeps only the first that many pairs of each design's list (a smaller, faster set)."""
    import cv2
    import numpy as np

    from defectops.core.taxonomy import Box
    from defectops.training.candidates import read_deeppcb_annotations, read_pair
    from defectops.training.config import CandidateConfig
    from defectops.training.crops import aligned_candidates, candidate_params

    root = out / (f"deeppcb-crops-{pairs_per_design}" if pairs_per_design else "deeppcb-crops")
    if (root / ".complete").is_file():
        return root, "false_call"
    data = deeppcb_root()
    cfg = CandidateConfig(tolerance=1, min_area=4, merge_distance=6, exact_min_area=12, close_min_area=20)
    params = candidate_params(cfg)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    written: list[tuple[str, str, Path]] = []
    from defectops.training.candidates import label_candidates

    taken: dict[str, int] = {}
    for line in (data / "trainval.txt").read_text().splitlines():
        image, ann = line.split()
        design = image.split("/", 1)[0]
        taken[design] = taken.get(design, 0) + 1
        if pairs_per_design and taken[design] > pairs_per_design:
            continue
        split = "test" if design in TEST_DESIGNS else "val" if design in VAL_DESIGNS else "train"
        stem = image.removesuffix(".jpg")
        template, tested = read_pair(data / f"{stem}_temp.jpg", data / f"{stem}_test.jpg")
        _aligned, cands = aligned_candidates(template, tested, params)
        gts = [Box(b.x1, b.y1, b.x2, b.y2, b.label) for b in read_deeppcb_annotations(data / ann)]
        labels = label_candidates(cands, gts, iou_threshold=cfg.iou_threshold)
        for i, (c, label) in enumerate(zip(cands, labels, strict=True)):
            name = label or "false_call"
            x1, y1, x2, y2 = (max(0, c.x1 - 4), max(0, c.y1 - 4), c.x2 + 5, c.y2 + 5)
            piece = tested[y1:y2, x1:x2]
            if piece.size == 0:
                continue
            folder = tmp / split / name
            folder.mkdir(parents=True, exist_ok=True)
            f = folder / f"{Path(stem).name}_{i:03d}.png"
            cv2.imwrite(str(f), piece)
            written.append((split, name, f))
    rng = np.random.default_rng(0)
    for k in rng.choice(len(written), int(len(written) * dup_fraction), replace=False):
        _split, _name, f = written[int(k)]
        shutil.copyfile(f, f.with_name(f.stem + "_copy.png"))
    defects = [w for w in written if w[1] != "false_call" and w[0] == "train"]
    for k in rng.choice(len(defects), conflicts, replace=False):
        split, _name, f = defects[int(k)]
        shutil.copyfile(f, tmp / split / "false_call" / (f.stem + "_conflict.png"))
    (tmp / ".complete").write_text("")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root, "false_call"


def run_recipe(root: Path, good: str, name: str, overrides: list[str], home: Path) -> dict[str, Any]:
    from defectops.core.fsutil import read_json
    from defectops.pipelines.config import load_config
    from defectops.pipelines.dag import DAG
    from defectops.pipelines.runners.local import prepare_run_root, run_step

    cfg = load_config(["+experiment=folder", f"data.root={root}", f"data.good_class={good}",
                       *RECIPES.get(name, []), *overrides])
    ctx = prepare_run_root(cfg, home)
    seconds: dict[str, float] = {}
    for step in DAG:
        if step.name == "register":
            break
        seconds[step.name] = run_step(step, ctx, cfg).seconds
    metrics = read_json(ctx.root / "metrics.json")
    train = read_json(ctx.root / "steps" / "train.json")["result"]
    validate = read_json(ctx.root / "steps" / "validate_data.json")["result"]
    history = train.get("final", {})
    return {"recipe": name, "overrides": [*RECIPES.get(name, []), *overrides], "run_root": str(ctx.root),
            "metrics": metrics, "train_seconds": seconds.get("train"), "seconds": seconds,
            "selected_epoch": train.get("selected_epoch"), "epochs": train.get("epochs"), "last_epoch": history,
            "val_macro_recall": train.get("selected", {}).get("val_macro_recall"),
            "validate": {k: v for k, v in validate.items() if k != "crops"}}


def summarise(r: dict[str, Any], reference: float) -> dict[str, Any]:
    from defectops.evaluation.intervals import wilson_interval
    from defectops.evaluation.metrics import ClassificationMetrics

    m = ClassificationMetrics.from_dict(r["metrics"])
    g = m.classes.index(m.good_class)
    cm = m.confusion
    defects = sum(sum(row) for i, row in enumerate(cm) if i != g)
    escapes = sum(row[g] for i, row in enumerate(cm) if i != g)
    good = sum(cm[g])
    false_calls = good - cm[g][g]
    recall = {c: wilson_interval(cm[i][i], sum(cm[i])).to_dict() for i, c in enumerate(m.classes)}
    return {"recipe": r["recipe"], "macro_recall": m.macro_recall, "per_class_recall": recall,
            "escapes": escapes, "defects": defects, "escape_rate": wilson_interval(escapes, defects).to_dict(),
            "false_calls": false_calls, "good": good, "false_call_rate": wilson_interval(false_calls, good).to_dict(),
            "accuracy": m.accuracy, "n_test": m.n, "train_seconds": r["train_seconds"],
            "train_x_reference": r["train_seconds"] / reference if r["train_seconds"] else None,
            "selected_epoch": r["selected_epoch"], "epochs": r["epochs"], "val_macro_recall": r.get("val_macro_recall"),
            "overrides": r["overrides"]}


def main() -> int:
    from bench_run import reference_seconds
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every recipe")
    ap.add_argument("--dataset", choices=("elpv", "deeppcb-crops"), default="elpv")
    ap.add_argument("--levels", type=int, choices=(2, 4), default=2, help="elpv: good/defect or four levels")
    ap.add_argument("--recipes", default="old,new", help="comma-separated: old, new")
    ap.add_argument("--pairs-per-design", type=int, default=0,
                    help="deeppcb-crops: keep the first N pairs of each design (0: all 1,000 pairs, ~12k crops)")
    ap.add_argument("--data-dir", type=Path, help="where the folder datasets are built (kept, reused)")
    ap.add_argument("--home", type=Path, help="DefectOps home for the runs (kept, resumable)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="defectops-folder-data-"))
    home = args.home or Path(tempfile.mkdtemp(prefix="defectops-folder-"))
    if args.dataset == "elpv":
        root, good = build_elpv(data_dir, args.levels)
    else:
        root, good = build_deeppcb_crops(data_dir, pairs_per_design=args.pairs_per_design)
    reference = reference_seconds()
    results = []
    for name in args.recipes.split(","):
        t0 = time.perf_counter()
        r = run_recipe(root, good, name, list(args.overrides), home)
        r["wall_seconds"] = time.perf_counter() - t0
        results.append(r)
        if args.json:  # after every recipe: a long benchmark keeps what it measured
            args.json.write_text(json.dumps({"dataset": args.dataset, "root": str(root), "reference_s": reference,
                                             "runs": results}, indent=2))
    rows = [summarise(r, reference) for r in results]
    t = Table(title=f"{args.dataset}: held-out test split (Wilson 95 % intervals); reference {reference:.2f} s")
    for col in ("recipe", "val macro recall", "macro recall", "escapes", "escape rate", "false-call rate", "train s",
                "x ref", "epoch"):
        t.add_column(col, justify="right")
    for s in rows:
        e, f = s["escape_rate"], s["false_call_rate"]
        val = "-" if s["val_macro_recall"] is None else f"{s['val_macro_recall']:.4f}"
        t.add_row(s["recipe"], val, f"{s['macro_recall']:.4f}", f"{s['escapes']}/{s['defects']}",
                  f"{e['point']:.4f} [{e['low']:.4f}, {e['high']:.4f}]",
                  f"{f['point']:.4f} [{f['low']:.4f}, {f['high']:.4f}]", f"{s['train_seconds']:.0f}",
                  f"{s['train_x_reference']:.0f}", f"{s['selected_epoch']}/{s['epochs']}")
    Console().print(t)
    print(json.dumps(rows, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"dataset": args.dataset, "root": str(root), "reference_s": reference,
                                         "runs": results, "summary": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
