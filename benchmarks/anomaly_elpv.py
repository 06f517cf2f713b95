"""PatchCore on ELPV (2,624 electroluminescence images of solar cells, ``pip install elpv-dataset``): fitted on good
cells only (defect probability 0), image AUROC on cells it never saw.

Split (seeded, stratified by cell type, mono and poly): ``--fit`` good cells fit the memory bank; the remaining good
cells and every defective cell are scored. Image AUROC with a stratified-bootstrap 95 % interval, overall, per cell
type, and for the cells the annotators were sure of (defect probability 1.0) against the held-out good ones.
Fit time, memory bank, peak RSS and images/s are printed with a same-process baseline (the backbone alone).

    .venv/bin/pip install elpv-dataset   # benchmark only, not a dependency of DefectOps
    .venv/bin/python benchmarks/anomaly_elpv.py
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def main() -> int:
    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    from defectops.evaluation.anomaly import auroc_interval
    from defectops.training.models.patchcore import create_anomaly_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224, help="input side in pixels (the cells are 300 x 300)")
    ap.add_argument("--fit", type=int, default=500, help="good cells that fit the memory bank")
    ap.add_argument("--model", default="patchcore_effnet_lite0")
    ap.add_argument("--layers", default="")
    ap.add_argument("--coreset-ratio", type=float, default=0.01)
    ap.add_argument("--max-bank", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError:
        raise SystemExit("ELPV is not installed: .venv/bin/pip install elpv-dataset") from None

    images, proba, types = load_dataset()
    rng = np.random.default_rng(args.seed)
    good = np.flatnonzero(proba == 0)
    fit_idx = np.concatenate([rng.permutation(good[types[good] == t])[: args.fit * (types[good] == t).sum()
                                                                         // len(good)] for t in ("mono", "poly")])
    scored = np.setdiff1d(np.arange(len(images)), fit_idx)

    def batch(idx: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images[idx]).float().div_(255.0)[:, None].expand(-1, 3, -1, -1)
        return torch.nn.functional.interpolate(x, size=(args.size, args.size), mode="bilinear", antialias=True)

    layers = tuple(args.layers.split(",")) if args.layers else None
    model = create_anomaly_model(args.model, layers=layers)
    t0 = time.perf_counter()
    marks: list[float] = []

    def coreset_progress(total: int, patches: int):
        marks.append(time.perf_counter())
        return None

    stats = model.fit((batch(fit_idx[i:i + 16]) for i in range(0, len(fit_idx), 16)),
                      coreset_ratio=args.coreset_ratio, max_bank=args.max_bank, seed=args.seed,
                      coreset_progress=coreset_progress)
    fit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores = []
    with torch.no_grad():
        for i in range(0, len(scored), 16):
            scores.append(model(batch(scored[i:i + 16]))[0].numpy())
    ips = len(scored) / (time.perf_counter() - t1)
    s = np.concatenate(scores)
    x = batch(scored[:16])
    t2 = time.perf_counter()
    with torch.no_grad():
        model.model.feature_extractor(model._normalise(x))
    base_ips = 16 / (time.perf_counter() - t2)
    y = proba[scored] > 0
    rows = {"all cells": np.ones(len(scored), bool),
            "mono": types[scored] == "mono", "poly": types[scored] == "poly",
            "sure defects (p = 1.0) vs good": (proba[scored] == 0) | (proba[scored] == 1.0)}
    figures: dict[str, object] = {"size": args.size, "layers": list(model.spec.layers), "fit_images": stats.images,
                                  "patches": stats.patches, "bank_size": stats.bank_size, "fit_s": fit_s,
                                  "coreset_s": fit_s - (marks[0] - t0) if marks else None,
                                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                  "images_per_s": ips, "baseline_images_per_s": base_ips}
    table = Table(title=f"PatchCore on ELPV ({args.size} px, {', '.join(model.spec.layers)}), fitted on "
                  f"{stats.images} good cells")
    table.add_column("scored cells")
    table.add_column("image AUROC [95 % bootstrap]")
    table.add_column("good / defective")
    for name, sel in rows.items():
        ci = auroc_interval(y[sel], s[sel])
        figures[name] = ci.to_dict()
        table.add_row(name, ci.format(), f"{int((~y[sel]).sum())} / {int(y[sel].sum())}")
    console.print(table)
    console.print(f"fit {fit_s:.1f} s, memory bank {stats.bank_size} of {stats.patches} patches, peak RSS "
                  f"{figures['peak_rss_mb']:.0f} MB, {ips:.1f} images/s (backbone alone {base_ips:.1f}, ratio "
                  f"{base_ips / ips:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
