"""INT8 for an anomaly (PatchCore) model: score parity with the checkpoint and images/s of the FP32 and INT8 ONNX files.

Takes the run root of a ``task=anomaly`` run that got at least through ``evaluate`` (``train/model.pt``,
``eval/anomaly.json``, ``eval/predictions.npz``). Writes the run's ``export/model.onnx`` when it is missing (the
export step's code, e.g. for a run whose gates failed at ``register``) and ``export/model.int8.onnx`` (always
rebuilt: the backbone quantized, the nearest-neighbour part FP32, ``pipelines/tasks/anomaly_int8.py``), then checks
it as ``verify_export`` does (``export/int8.json``: max relative score difference, decision flips at the threshold,
the test gates at the checkpoint's threshold) and times both ONNX files on the same val + test images in this
process (``--threads`` intra-op threads, batches of ``anomaly.batch_size``, one warm-up pass, ``--repeats`` passes
each, alternating). Ratios are against the FP32 ONNX file timed in the same process.

    DEFECTOPS_HOME=... .venv/bin/python benchmarks/anomaly_int8.py RUN_ROOT [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    import numpy as np

    from defectops.core.layout import RUN
    from defectops.evaluation.metrics import ClassificationMetrics
    from defectops.pipelines.config import from_yaml
    from defectops.pipelines.context import StepContext
    from defectops.pipelines.tasks.anomaly import AnomalyTask
    from defectops.pipelines.tasks.anomaly_int8 import export_anomaly_int8
    from defectops.pipelines.tasks.anomaly_verify import check_anomaly_int8
    from defectops.serving.onnx_export import onnx_session
    from defectops.training.data import load_split, to_tensor
    from defectops.training.snapshot import load_snapshot

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="run root of a task=anomaly run (evaluated)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    root = args.root.resolve()
    cfg = from_yaml((root / "config.yaml").read_text())
    ctx = StepContext(root.name, root, root.parent.parent, "benchmark")
    if not ctx.path(RUN.onnx).is_file():
        AnomalyTask(cfg.anomaly).export(ctx, cfg.export, cfg.data)
    t = time.perf_counter()
    calibration = export_anomaly_int8(ctx, cfg.export, cfg.data.good_class)
    quantize_s = time.perf_counter() - t
    baseline = ctx.path(RUN.champion_metrics)
    champion = ClassificationMetrics.from_dict(json.loads(baseline.read_text())) if baseline.is_file() else None
    check = check_anomaly_int8(cfg.anomaly, ctx, cfg.data.good_class, cfg.gates, champion)

    crops = load_snapshot(ctx.path(RUN.crops))
    x = to_tensor(np.concatenate([load_split(crops, s)[0] for s in ("val", "test")])).numpy()
    bs = cfg.anomaly.batch_size
    sessions = {p: onnx_session(ctx.path(f), args.threads) for p, f in (("fp32", RUN.onnx), ("int8", RUN.onnx_int8))}

    def one_pass(session: object) -> float:
        t0 = time.perf_counter()
        for i in range(0, len(x), bs):
            session.run(["scores", "anomaly_map"], {"images": x[i:i + bs]})  # type: ignore[attr-defined]
        return time.perf_counter() - t0

    for s in sessions.values():
        one_pass(s)  # warm-up
    seconds = dict.fromkeys(sessions, 0.0)
    for _ in range(args.repeats):
        for p, s in sessions.items():
            seconds[p] += one_pass(s)
    ips = {p: args.repeats * len(x) / seconds[p] for p in sessions}
    par = check["parity"]
    out = {"root": str(root), "input_hw": [cfg.anomaly.height, cfg.anomaly.width], "layers": cfg.anomaly.layers,
           "images": len(x), "threads": args.threads, "batch_size": bs, "calibration": calibration,
           "quantize_s": round(quantize_s, 1), "max_rel_diff": par["max_rel_diff"], "max_abs_diff": par["max_abs_diff"],
           "decision_flips": par["decision_flips"], "n": par["n"], "publish": check["publish"],
           "reasons": check["reasons"], "int8_gates_passed": check["gates"]["passed"],
           "macro_recall": check["macro_recall"], "reference_macro_recall": check["reference_macro_recall"],
           "images_per_s": {p: round(v, 2) for p, v in ips.items()},
           "int8_vs_fp32": round(ips["int8"] / ips["fp32"], 2),
           "bytes": {p: ctx.path(f).stat().st_size for p, f in (("fp32", RUN.onnx), ("int8", RUN.onnx_int8))}}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
