"""Serving latency of the default model: PyTorch eager vs ONNX FP32 vs ONNX INT8 (and Triton when a URL is given),
with the issue's targets checked as ratios measured in one process (ONNX FP32 >= 2x eager at batch 1, INT8 >= 1.5x
ONNX FP32 at batch 1 with at most 0.5 points of macro-recall drop).

Trains the default model first (what `make run` does) unless --run-root names an existing run.

    .venv/bin/python benchmarks/bench_latency.py                           # default run in a temporary home
    .venv/bin/python benchmarks/bench_latency.py --run-root defectops-home/runs/<run-id>
    .venv/bin/python benchmarks/bench_latency.py --line-rate 900 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def main() -> int:
    from typer.testing import CliRunner

    from defectops.pipelines.cli import app

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-root", type=Path, help="an existing run root (default: train the default model)")
    ap.add_argument("--line-rate", type=float, default=600.0, help="boards per minute (default 600)")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per runtime and batch size")
    ap.add_argument("--triton-url", help="also time this Triton server (its model name: --triton-model)")
    ap.add_argument("--triton-model", default="defectops-aoi")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    root = args.run_root
    if root is None:
        from defectops.pipelines.config import load_config
        from defectops.pipelines.runners.local import run_pipeline

        ctx, _ = run_pipeline(load_config([]), home=Path(tempfile.mkdtemp(prefix="defectops-latency-")))
        root = ctx.root
    cli = ["bench", "latency", "--model", str(root), "--line-rate", str(args.line_rate), "--json",
           "--seconds", str(args.seconds)]
    if args.triton_url:
        cli += ["--triton-url", args.triton_url, "--triton-model", args.triton_model]
    res = CliRunner().invoke(app, cli)
    if res.exit_code != 0:
        print(res.output)
        return res.exit_code
    out = json.loads(res.output)
    eager, fp32, int8 = out["eager"], out["onnx_fp32"], out["onnx_int8"]
    ratios = {"onnx_fp32_vs_eager_b1": fp32["images_per_s"] / eager["images_per_s"]}
    checks = {"onnx_fp32 >= 2x eager at batch 1": ratios["onnx_fp32_vs_eager_b1"] >= 2.0}
    if int8:
        ratios["onnx_int8_vs_fp32_b1"] = int8["images_per_s"] / fp32["images_per_s"]
        drop = out["int8_macro_recall_drop"]
        checks["onnx_int8 >= 1.5x onnx_fp32 at batch 1"] = ratios["onnx_int8_vs_fp32_b1"] >= 1.5
        checks["int8 macro-recall drop <= 0.5 points"] = drop is not None and drop <= 0.005
    for name in ("eager", "onnx_fp32", "onnx_int8", "triton"):
        r = out.get(name)
        if r:
            print(f"{name:10s} batch 1: p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  {r['images_per_s']:8.0f} "
                  f"img/s | best batch {r['best']['batch']:3d}: {r['best']['images_per_s']:8.0f} img/s | board "
                  f"{r['line']['per_board_ms']:.2f} ms of {out['budget_ms']:.1f} ms")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    print(f"INT8: {out['int8']}; macro-recall drop {out['int8_macro_recall_drop']}")
    for k, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {k}")
    if args.json:
        args.json.write_text(json.dumps({**out, "ratios": ratios, "checks": checks}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
