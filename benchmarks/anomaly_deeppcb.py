"""PatchCore on DeepPCB with the templates as the only training data: boxes from anomaly maps, scored by the
benchmark's IoU rule (IoU > 0.33), type-agnostic (the model never saw a label).

Boards: the groups of ``trainval.txt`` (board designs) are split in two, by group. The memory bank is fitted on the
**templates** (defect-free golden boards) of the first half's pairs; no tested image and no label is used to fit.
- **select** (first half's tested images): the map threshold that turns maps into boxes is chosen here, as the value
  that maximises the F-score of box recall and box precision at IoU > 0.33;
- **held-out designs** (second half): their tested images scored with that threshold. Their templates were never in
  the bank: this is the "new design, no golden board fitted yet" case;
- **seen designs** (the second half's templates added to the bank): the "golden boards of this design fitted"
  case a line would run.
Reported per set: box recall at IoU > 0.33 (the share of annotated defects some box covers), box precision (the
share of boxes covering a defect), boxes per image, with Wilson 95 % intervals. Plus fit time, bank size and
images/s.

    .venv/bin/python benchmarks/anomaly_deeppcb.py --pairs 160
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "deeppcb" / "PCBData"


def main() -> int:
    import cv2
    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    from defectops.evaluation.anomaly_boxes import anomaly_boxes
    from defectops.evaluation.deeppcb import GroundTruth, boxes_found, deeppcb_iou
    from defectops.evaluation.intervals import wilson_interval
    from defectops.training.candidates import read_deeppcb_annotations
    from defectops.training.data import to_tensor
    from defectops.training.models.patchcore import create_anomaly_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--pairs", type=int, default=160, help="pairs per half (a seeded sample of the groups' pairs)")
    ap.add_argument("--size", type=int, default=320, help="input side (the boards are 640 x 640)")
    ap.add_argument("--layers", default="blocks.2,blocks.4")
    ap.add_argument("--max-bank", type=int, default=6000)
    ap.add_argument("--coreset-ratio", type=float, default=0.01)
    ap.add_argument("--min-area", type=int, default=2, help="smallest region (map pixels) that becomes a box")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()

    lines = [ln.split() for ln in (args.root / "trainval.txt").read_text().splitlines() if ln.strip()]
    groups = sorted({ln[0].split("/")[0] for ln in lines})
    rng = np.random.default_rng(args.seed)
    order = list(rng.permutation(groups))
    first = set(order[: len(order) // 2])
    halves: dict[str, list[list[str]]] = {"a": [], "b": []}
    for ln in lines:
        halves["a" if ln[0].split("/")[0] in first else "b"].append(ln)
    for k in halves:
        idx = rng.permutation(len(halves[k]))[: args.pairs]
        halves[k] = [halves[k][i] for i in sorted(idx)]

    def image(rel: str, kind: str) -> np.ndarray:
        p = args.root / rel.replace(".jpg", f"_{kind}.jpg")
        im = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if im is None:
            raise SystemExit(f"{p} is not a readable image")
        return cv2.resize(cv2.cvtColor(im, cv2.COLOR_BGR2RGB), (args.size, args.size), interpolation=cv2.INTER_AREA)

    def batches(pairs: list[list[str]], kind: str, n: int = 16):
        for i in range(0, len(pairs), n):
            yield to_tensor(np.stack([image(p[0], kind) for p in pairs[i:i + n]]))

    def maps_of(model, pairs: list[list[str]]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for x in batches(pairs, "test"):
                out.append(model(x)[1][:, 0].numpy())
        return np.concatenate(out)

    gts = {p[0]: [GroundTruth(b.x1, b.y1, b.x2, b.y2, b.label) for b in read_deeppcb_annotations(args.root / p[1])]
           for h in halves.values() for p in h}
    scale = (640 / args.size, 640 / args.size)

    def box_scores(maps: np.ndarray, pairs: list[list[str]], thr: float) -> dict[str, float]:
        found = covered = n_boxes = n_gt = 0
        for m, p in zip(maps, pairs, strict=True):
            boxes = [b[:4] for b in anomaly_boxes(m, thr, min_area=args.min_area, scale=scale)]
            g = gts[p[0]]
            found += sum(boxes_found(g, boxes))
            covered += sum(any(deeppcb_iou(gt, b) > 0.33 for gt in g) for b in boxes)
            n_boxes += len(boxes)
            n_gt += len(g)
        return {"found": found, "n_gt": n_gt, "covered": covered, "n_boxes": n_boxes, "images": len(pairs)}

    def f_score(r: dict[str, float]) -> float:
        rec = r["found"] / max(r["n_gt"], 1)
        prec = r["covered"] / max(r["n_boxes"], 1)
        return 2 * rec * prec / max(rec + prec, 1e-12)

    layers = tuple(args.layers.split(","))
    model = create_anomaly_model("patchcore_effnet_lite0", layers=layers)
    t0 = time.perf_counter()
    stats = model.fit(batches(halves["a"], "temp"), coreset_ratio=args.coreset_ratio, max_bank=args.max_bank,
                      seed=args.seed)
    fit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    sel_maps = maps_of(model, halves["a"])
    ips = len(halves["a"]) / (time.perf_counter() - t1)
    candidates = np.quantile(sel_maps, np.linspace(0.95, 0.9999, 40))
    best = max(candidates, key=lambda t: f_score(box_scores(sel_maps, halves["a"], float(t))))
    threshold = float(best)
    results = {"select (designs in the bank)": box_scores(sel_maps, halves["a"], threshold),
               "held-out designs (templates not in the bank)": box_scores(maps_of(model, halves["b"]), halves["b"],
                                                                          threshold)}
    both = create_anomaly_model("patchcore_effnet_lite0", layers=layers)
    both.fit(batches(halves["a"] + halves["b"], "temp"), coreset_ratio=args.coreset_ratio, max_bank=args.max_bank,
             seed=args.seed)
    results["held-out pairs, their designs' templates in the bank"] = box_scores(maps_of(both, halves["b"]),
                                                                                 halves["b"], threshold)

    table = Table(title=f"PatchCore on DeepPCB templates ({args.size} px, {', '.join(layers)}), boxes from maps at "
                  f"IoU > 0.33, type-agnostic")
    for col in ("tested images", "box recall [95 %]", "box precision [95 %]", "boxes / image"):
        table.add_column(col)
    figures: dict[str, object] = {"size": args.size, "layers": list(layers), "pairs_per_half": args.pairs,
                                  "bank_size": stats.bank_size, "patches": stats.patches, "fit_s": fit_s,
                                  "images_per_s": ips, "map_threshold": threshold, "sets": {}}
    for name, r in results.items():
        rec = wilson_interval(int(r["found"]), int(r["n_gt"]))
        prec = wilson_interval(int(r["covered"]), int(r["n_boxes"]))
        figures["sets"][name] = {**r, "recall": rec.to_dict(), "precision": prec.to_dict()}  # type: ignore[index]
        table.add_row(f"{name} ({r['images']})", rec.format(), prec.format(), f"{r['n_boxes'] / r['images']:.1f}")
    console.print(table)
    console.print(f"fit {fit_s:.1f} s on {stats.images} templates, memory bank {stats.bank_size} of {stats.patches} "
                  f"patches, {ips:.1f} tested images/s; map threshold {threshold:.4g} (chosen on the select set)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
