"""DeepPCB candidate step: recall ceiling at the benchmark's IoU > 0.33, candidates per image, the benchmark's score of
a perfect classifier, and the time of read_pair + find_candidates.

Why: the board-level detector can only report what the candidate step proposes, so these ceilings bound its DeepPCB
mAP and F-score, and the step's time bounds its throughput (the target is >= 62 images/s end to end on 2 CPU cores).
Parameters are tuned on the ``train`` part of our split of DeepPCB trainval (``assign_split(stem, 0.15, 0.2, 0)``);
the ``test`` part is the held-out part the numbers are reported on.

    .venv/bin/python benchmarks/deeppcb_candidates.py            # table: previous and current defaults, train + test
    .venv/bin/python benchmarks/deeppcb_candidates.py --sweep    # + one-at-a-time parameter sweep on train
    DEFECTOPS_DEEPPCB=/path/to/deeppcb .venv/bin/python benchmarks/deeppcb_candidates.py

Columns: ``recall@.33`` = fraction of ground-truth boxes with a detection box (:func:`detection_box` of a candidate)
at IoU > 0.33; ``cand/img`` = candidates per image; ``oracle F``/``oracle mAP`` = the benchmark's F-score/mAP when a
perfect classifier keeps exactly the candidates above 0.33 with their ground truth's class (duplicates of a ground
truth are false positives under the benchmark's one-to-one matching); ``target F`` = the F-score if the classifier
reproduced its training targets (:func:`label_candidates`: IoU > 0.1 or centre inside) exactly, fragments included;
``legacy`` = :func:`gt_found` on the padded candidate boxes (the candidate step's own recall measure).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import defectops.training.candidates as C  # noqa: E402
from defectops.core.taxonomy import Box  # noqa: E402
from defectops.evaluation.deeppcb import Detection, GroundTruth, boxes_found, oracle_detections, score  # noqa: E402
from defectops.training.candidates import (  # noqa: E402
    Candidate,
    detection_box,
    find_candidates,
    gt_found,
    label_candidates,
    read_deeppcb_annotations,
    read_pair,
)
from defectops.training.snapshot import assign_split  # noqa: E402

SPLIT_VAL, SPLIT_TEST, SPLIT_SEED = 0.15, 0.2, 0  # benchmarks/deeppcb.py's split: tune on train, report on test


@dataclass(frozen=True)
class Pair:
    key: str
    template_path: Path
    tested_path: Path
    gt: tuple[Box, ...]


@dataclass(frozen=True)
class Config:
    name: str
    kwargs: dict[str, Any]
    grow: int
    square_cleanup: bool = False  # the 3x3 square opening of the previous defaults


CURRENT = Config("exact XOR (find_candidates defaults)", {}, C.DETECTION_GROW)
PREVIOUS = Config("previous defaults, padded box", {"min_area": 4, "align": False, "split_side": 0}, 0, True)
PREVIOUS_GROWN = Config("previous defaults + detection_box", PREVIOUS.kwargs, C.DETECTION_GROW, True)


def experiment_config(root: Path) -> Config:
    """The candidate settings of ``+experiment=deeppcb`` (what training and detection use)."""
    from defectops.pipelines.config import load_config
    from defectops.training.crops import candidate_params

    cand = load_config(["+experiment=deeppcb", f"data.root={root}"]).data.candidates
    params = candidate_params(cand)
    defaults = candidate_params(type(cand)())
    return Config("deeppcb experiment (tol 1 + exact + closed)", {k: v for k, v in params.items() if v != defaults[k]
                                                              or k in ("min_area", "merge_distance")},
                  cand.box_margin)


def data_root() -> Path:
    base = Path(os.environ.get("DEFECTOPS_DEEPPCB", REPO / ".." / "shared" / "datasets" / "deeppcb")).resolve()
    for cand in (base / "PCBData", base):
        if (cand / "trainval.txt").is_file():
            return cand
    raise SystemExit(f"DeepPCB not found under {base}: set DEFECTOPS_DEEPPCB to the DeepPCB (or its PCBData) folder")


def load_parts(root: Path) -> dict[str, list[Pair]]:
    parts: dict[str, list[Pair]] = {"train": [], "val": [], "test": []}
    for line in (root / "trainval.txt").read_text().splitlines():
        if not line.strip():
            continue
        image_rel, ann_rel = line.split()
        stem = str(root / image_rel)[: -len(".jpg")]
        key = Path(image_rel).stem
        pair = Pair(key, Path(stem + "_temp.jpg"), Path(stem + "_test.jpg"),
                    tuple(read_deeppcb_annotations(root / ann_rel)))
        parts[assign_split(key, SPLIT_VAL, SPLIT_TEST, SPLIT_SEED)].append(pair)
    return parts


@contextmanager
def cleanup_kernel(square: bool) -> Iterator[None]:
    """Run with the previous 3x3 square opening instead of the cross (only to reproduce the previous defaults)."""
    saved = C._CLEANUP
    if square:
        C._CLEANUP = np.ones((C.CLEANUP_KERNEL, C.CLEANUP_KERNEL), np.uint8)
    try:
        yield
    finally:
        C._CLEANUP = saved


def ground_truths(boxes: Sequence[Box]) -> list[GroundTruth]:
    return [GroundTruth(b.x1, b.y1, b.x2, b.y2, b.label) for b in boxes]


def evaluate(images: Sequence[tuple[Pair, np.ndarray, np.ndarray]], cfg: Config) -> dict[str, float]:
    found: list[bool] = []
    legacy: list[bool] = []
    oracle: dict[str, tuple[list[GroundTruth], list[Detection]]] = {}
    target: dict[str, tuple[list[GroundTruth], list[Detection]]] = {}
    n_cands = 0
    with cleanup_kernel(cfg.square_cleanup):
        for pair, template, tested in images:
            cands = find_candidates(template, tested, **cfg.kwargs)
            shape = (int(tested.shape[0]), int(tested.shape[1]))
            boxes = [detection_box(c, cfg.grow, shape) for c in cands]
            gts = ground_truths(pair.gt)
            n_cands += len(cands)
            found += boxes_found(gts, boxes)
            legacy += gt_found(cands, pair.gt)
            oracle[pair.key] = (gts, oracle_detections(gts, boxes))
            labels = label_candidates(cands, pair.gt)
            target[pair.key] = (gts, [Detection(*b, 1.0, lab) for b, lab in zip(boxes, labels, strict=True)
                                      if lab != "false_call"])
    o, t = score(oracle), score(target)
    return {"recall": float(np.mean(found)), "cands": n_cands / len(images), "oracle_f": o.fscore,
            "oracle_map": o.map, "oracle_p": o.precision, "target_f": t.fscore, "legacy": float(np.mean(legacy))}


def timing(pairs: Sequence[Pair], workers: int, repeats: int = 3) -> dict[str, float]:
    """Per image, one pair after the other on one thread: wall and CPU (thread) ms of read_pair and of
    find_candidates; and images/s of both with ``workers`` threads. Best of ``repeats`` passes; OpenCV's own threading
    off, so the workers are the only parallelism (a detector runs one board per core). CPU time is what to trust on
    a shared machine: wall time there includes waiting for other processes."""
    cv2.setNumThreads(1)
    try:
        passes = []
        for _ in range(repeats):
            acc = np.zeros(4)  # read wall, read cpu, find wall, find cpu
            for p in pairs:
                w0, c0 = time.perf_counter(), time.thread_time()
                template, tested = read_pair(p.template_path, p.tested_path)
                w1, c1 = time.perf_counter(), time.thread_time()
                find_candidates(template, tested)
                acc += (w1 - w0, c1 - c0, time.perf_counter() - w1, time.thread_time() - c1)
            passes.append(1000 * acc / len(pairs))
        best = min(passes, key=lambda v: v[1] + v[3])

        def one(p: Pair) -> list[Candidate]:
            return find_candidates(*read_pair(p.template_path, p.tested_path))

        rates = []
        with ThreadPoolExecutor(workers) as pool:
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(pool.map(one, pairs))
                rates.append(len(pairs) / (time.perf_counter() - t0))
    finally:
        cv2.setNumThreads(0)
    return {"read_ms": best[0], "read_cpu_ms": best[1], "find_ms": best[2], "find_cpu_ms": best[3],
            "rate": max(rates)}


def print_table(rows: list[tuple[str, str, int, int, dict[str, float]]]) -> None:
    head = (f"{'configuration':42s} {'part':5s} {'imgs':>4s} {'GT':>5s} {'recall@.33':>10s} {'cand/img':>8s} "
            f"{'oracle F':>8s} {'oracle P':>8s} {'oracle mAP':>10s} {'target F':>8s} {'legacy':>7s}")
    print(head)
    print("-" * len(head))
    for name, part, n, n_gt, r in rows:
        print(f"{name:42s} {part:5s} {n:4d} {n_gt:5d} {r['recall']:10.4f} {r['cands']:8.2f} {r['oracle_f']:8.4f} "
              f"{r['oracle_p']:8.4f} {r['oracle_map']:10.4f} {r['target_f']:8.4f} {r['legacy']:7.4f}")


def sweep_configs(base: Config) -> list[Config]:
    """One-at-a-time variations around ``base`` (for tuning on train only)."""

    def vary(name: str, grow: int | None = None, square: bool = False, **kw: Any) -> Config:
        return Config(name, {**base.kwargs, **kw}, base.grow if grow is None else grow, square)

    out = [vary("no alignment", align=False), vary("square 3x3 opening", square=True), vary("no split", split_side=0),
           vary("split_side=100", split_side=100), vary("tolerance 0 (exact only)", tolerance=0),
           vary("tolerance 2", tolerance=2), vary("no exact pass", exact_min_area=0)]
    out += [vary(f"min_area={v}", min_area=v) for v in (2, 6, 9)]
    out += [vary(f"exact_min_area={v}", exact_min_area=v) for v in (8, 16, 20)]
    out += [vary(f"closed pass close_min_area={v}", close_min_area=v) for v in (12, 20, 30)]
    out += [vary(f"merge_distance={v}", merge_distance=v) for v in (3, 4, 8)]
    out += [vary(f"detection margin {C.DEFAULT_PAD + g} (grow={g})", grow=g) for g in (4, 5, 7, 8)]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also sweep parameters one at a time on the train part")
    ap.add_argument("--workers", type=int, default=2, help="threads for the throughput measurement (default 2)")
    ap.add_argument("--no-timing", action="store_true", help="skip the timing")
    args = ap.parse_args(argv)

    root = data_root()
    parts = load_parts(root)
    loaded: dict[str, list[tuple[Pair, np.ndarray, np.ndarray]]] = {}
    for part in ("train", "test"):
        loaded[part] = [(p, *read_pair(p.template_path, p.tested_path)) for p in parts[part]]
    print(f"DeepPCB trainval at {root}: " + ", ".join(f"{k} {len(v)} pairs" for k, v in parts.items())
          + f" (assign_split val={SPLIT_VAL}, test={SPLIT_TEST}, seed={SPLIT_SEED}); IoU > 0.33\n")

    rows = []
    experiment = experiment_config(root)
    for cfg in (PREVIOUS, PREVIOUS_GROWN, CURRENT, experiment):
        for part in ("train", "test"):
            imgs = loaded[part]
            rows.append((cfg.name, part, len(imgs), sum(len(p.gt) for p, _, _ in imgs), evaluate(imgs, cfg)))
    print_table(rows)

    if args.sweep:
        print("\nsweep on train (one change at a time from the current defaults):")
        imgs = loaded["train"]
        n_gt = sum(len(p.gt) for p, _, _ in imgs)
        print_table([(cfg.name, "train", len(imgs), n_gt, evaluate(imgs, cfg))
                     for cfg in [experiment, *sweep_configs(experiment)]])

    if not args.no_timing:
        pairs = parts["train"] + parts["test"]
        t = timing(pairs, args.workers)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
        print(f"\ntiming over {len(pairs)} pairs, best of 3 ({os.cpu_count()} CPUs, load average {load:.1f}, "
              "OpenCV threads off):")
        print(f"  one thread, pair after pair, CPU time: read_pair {t['read_cpu_ms']:.2f} ms + find_candidates "
              f"{t['find_cpu_ms']:.2f} ms = {t['read_cpu_ms'] + t['find_cpu_ms']:.2f} ms/image")
        print(f"  one thread, pair after pair, wall time: read_pair {t['read_ms']:.2f} ms + find_candidates "
              f"{t['find_ms']:.2f} ms = {t['read_ms'] + t['find_ms']:.2f} ms/image")
        print(f"  {args.workers} worker threads: {t['rate']:.0f} images/s ({1000 / t['rate']:.2f} ms/image wall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
