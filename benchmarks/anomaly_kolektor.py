"""PatchCore (``task=anomaly``'s model) on KolektorSDD: fitted on good images only, judged on images it never saw.

Splits (grouped so that the 16 byte-identical train pairs stay on one side):
- **fit**: the good train images except every 5th duplicate group (the memory bank sees only these);
- **val**: the dataset's val split (69 good, 10 defective): the threshold is chosen here, for ``--escape-rate``;
- **test**: the held-out good train images + the 42 defective train images: escape and false-call rates at the
  val threshold, with 95 % Wilson intervals.
Image AUROC (with a stratified-bootstrap 95 % interval) and pixel AUROC (polygons rasterised at the model's input
size) are reported on val alone (choose settings on this one), on val + the defective train images (the issue's
evaluation set) and on test (held out from any choice made on val).

Speed and memory on this machine: fit time (embedding + coreset), memory-bank size, peak RSS, images/s at inference,
against a same-process baseline (the backbone's plain forward pass on the same images), so the ratio says what the
memory bank and the nearest-neighbour search add.

    .venv/bin/python benchmarks/anomaly_kolektor.py
    .venv/bin/python benchmarks/anomaly_kolektor.py --size 224x560 --layers blocks.2,blocks.4 --max-bank 10000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "kolektorsdd" / "Datasets"


def _duplicate_group(name: str) -> int:
    """KolektorSDD's byte-identical pairs (DATASET.md): 000-007 = 143-150, 096-103 = 223-230."""
    i = int(name)
    if 143 <= i <= 150:
        return i - 143
    if 223 <= i <= 230:
        return i - 223 + 96
    return i


def main() -> int:
    import cv2
    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    from defectops.evaluation.anomaly import (
        ScoreNormalization,
        anomaly_probabilities,
        auroc_interval,
        choose_threshold,
        pixel_auroc,
    )
    from defectops.evaluation.intervals import wilson_interval
    from defectops.evaluation.metrics import classification_metrics
    from defectops.training.data import to_tensor
    from defectops.training.models.patchcore import create_anomaly_model
    from defectops.training.yolo_seg import rasterize, read_yolo_seg

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="KolektorSDD's Datasets/ folder")
    ap.add_argument("--size", default="192x480", help="input WIDTHxHEIGHT (default 192x480)")
    ap.add_argument("--model", default="patchcore_effnet_lite0")
    ap.add_argument("--layers", default="", help="feature layers, comma-separated (default: the model's)")
    ap.add_argument("--coreset-ratio", type=float, default=0.01)
    ap.add_argument("--max-bank", type=int, default=10000)
    ap.add_argument("--neighbors", type=int, default=9)
    ap.add_argument("--escape-rate", type=float, default=0.05, help="target escape rate for the val threshold")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    w, h = (int(v) for v in args.size.lower().split("x"))

    samples = read_yolo_seg(args.root)
    good_train = [s for s in samples if s.split == "train" and not s.defective]
    held = set(sorted({_duplicate_group(s.path.stem) for s in good_train})[::5])
    fit_set = [s for s in good_train if _duplicate_group(s.path.stem) not in held]
    val = [s for s in samples if s.split == "val"]
    bad_train = [s for s in samples if s.split == "train" and s.defective]
    test = [s for s in good_train if _duplicate_group(s.path.stem) in held] + bad_train

    def load(batch: list) -> torch.Tensor:
        imgs = []
        for s in batch:
            im = cv2.imread(str(s.path), cv2.IMREAD_COLOR)
            if im is None:
                raise SystemExit(f"{s.path} is not a readable image")
            imgs.append(cv2.resize(cv2.cvtColor(im, cv2.COLOR_BGR2RGB), (w, h), interpolation=cv2.INTER_AREA))
        return to_tensor(np.stack(imgs))

    def batches(items: list, n: int = 8):
        for i in range(0, len(items), n):
            yield load(items[i:i + n])

    layers = tuple(args.layers.split(",")) if args.layers else None
    model = create_anomaly_model(args.model, num_neighbors=args.neighbors, layers=layers)
    t0 = time.perf_counter()
    coreset_t: list[float] = []

    def coreset_progress(total: int, patches: int):
        coreset_t.append(time.perf_counter())
        console.print(f"coreset: {total} of {patches} patches")
        return None

    stats = model.fit(batches(fit_set), coreset_ratio=args.coreset_ratio, max_bank=args.max_bank,
                      coreset_progress=coreset_progress)
    fit_s = time.perf_counter() - t0
    embed_s = coreset_t[0] - t0 if coreset_t else float("nan")

    def score(items: list) -> tuple[np.ndarray, np.ndarray, float]:
        scores, maps = [], []
        t = time.perf_counter()
        with torch.no_grad():
            for x in batches(items):
                s, m = model(x)
                scores.append(s.numpy())
                maps.append(m[:, 0].numpy().astype(np.float32))
        return np.concatenate(scores), np.concatenate(maps), len(items) / (time.perf_counter() - t)

    val_s, val_m, _ = score(val)
    test_s, test_m, ips = score(test)
    features = model.model.feature_extractor
    x = load(test[:8])
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(3):
            features(model._normalise(x))
    base_ips = 24 / (time.perf_counter() - t)

    bad_s, bad_m = test_s[len(test) - len(bad_train):], test_m[len(test) - len(bad_train):]
    eval_y = np.array([s.defective for s in val] + [True] * len(bad_train))
    eval_s = np.concatenate([val_s, bad_s])
    eval_masks = np.stack([rasterize(s.polygons, w, h) for s in val + bad_train])
    eval_maps = np.concatenate([val_m, bad_m])
    test_y = np.array([s.defective for s in test])
    test_masks = np.stack([rasterize(s.polygons, w, h) for s in test])
    val_y = np.array([s.defective for s in val])

    thr = choose_threshold(val_y, val_s, max_escape_rate=args.escape_rate, max_false_call_rate=0.2)
    norm = ScoreNormalization.fit(thr.value, val_s[~val_y])
    m = classification_metrics(test_y.astype(int), anomaly_probabilities(test_s, norm), ("good", "defect"), "good")
    esc_n = int(test_y.sum())
    fc_n = int((~test_y).sum())
    esc = wilson_interval(round(m.escape_rate * esc_n), esc_n)
    fc = wilson_interval(round(m.false_call_rate * fc_n), fc_n)
    eval_ci = auroc_interval(eval_y, eval_s)
    val_ci = auroc_interval(val_y, val_s)
    test_ci = auroc_interval(test_y, test_s)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    figures = {
        "size": [w, h], "model": args.model, "layers": list(model.spec.layers), "coreset_ratio": args.coreset_ratio,
        "max_bank": args.max_bank, "fit_images": stats.images, "patches": stats.patches,
        "bank_size": stats.bank_size, "embedding_dim": stats.embedding_dim, "fit_s": fit_s, "embed_s": embed_s,
        "coreset_s": fit_s - embed_s, "peak_rss_mb": rss_mb, "images_per_s": ips, "baseline_images_per_s": base_ips,
        "val_set": {"n_good": int((~val_y).sum()), "n_defect": int(val_y.sum()), "image_auroc": val_ci.to_dict(),
                    "pixel_auroc": pixel_auroc(np.stack([rasterize(s.polygons, w, h) for s in val]), val_m)},
        "eval_set": {"n_good": int((~eval_y).sum()), "n_defect": int(eval_y.sum()),
                     "image_auroc": eval_ci.to_dict(), "pixel_auroc": pixel_auroc(eval_masks, eval_maps)},
        "test_set": {"n_good": fc_n, "n_defect": esc_n, "image_auroc": test_ci.to_dict(),
                     "pixel_auroc": pixel_auroc(test_masks, test_m), "escape_rate": esc.to_dict(),
                     "false_call_rate": fc.to_dict()},
        "threshold": thr.to_dict(), "backbone_sha256": model.weights_info.get("weights_sha256"),
    }
    table = Table(title=f"PatchCore on KolektorSDD ({w}x{h}, {', '.join(model.spec.layers)})")
    table.add_column("figure")
    table.add_column("value")
    table.add_row("image AUROC, val only (select settings on this)", f"{val_ci.format()} (n = "
                  f"{int((~val_y).sum())} good, {int(val_y.sum())} defective)")
    table.add_row("image AUROC, val + defective train", f"{eval_ci.format()} (n = {int((~eval_y).sum())} good, "
                  f"{int(eval_y.sum())} defective)")
    table.add_row("pixel AUROC, val + defective train", f"{figures['eval_set']['pixel_auroc']:.4f}")
    table.add_row("image AUROC, test (held-out good + defective train)", test_ci.format())
    table.add_row("pixel AUROC, test", f"{figures['test_set']['pixel_auroc']:.4f}")
    table.add_row(f"threshold (val, escape target {args.escape_rate})",
                  f"{thr.value:.4f}: val escape {thr.val_escape_rate}, val false calls {thr.val_false_call_rate:.3f}")
    table.add_row("test escape rate", f"{esc.format()} (n = {esc_n} defective)")
    table.add_row("test false-call rate", f"{fc.format()} (n = {fc_n} good)")
    table.add_row("fit", f"{fit_s:.1f} s (embedding {embed_s:.1f} s, coreset {fit_s - embed_s:.1f} s) on "
                  f"{stats.images} good images")
    table.add_row("memory bank", f"{stats.bank_size} of {stats.patches} patches x {stats.embedding_dim}")
    table.add_row("peak RSS", f"{rss_mb:.0f} MB")
    table.add_row("inference", f"{ips:.1f} images/s; backbone alone {base_ips:.1f} images/s "
                  f"(ratio {base_ips / ips:.2f}x)")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
