"""Wall time of each step of a `defectops run`, in a fresh home, with a same-process baseline.

These machines are noisy, so besides seconds the benchmark prints each step's time as a ratio to a fixed reference
workload measured in the same process just before (one pass of a small CNN over fixed random crops): compare ratios
between machines and commits, not seconds.

    .venv/bin/python benchmarks/bench_run.py                      # the default run (what `make run` does)
    .venv/bin/python benchmarks/bench_run.py +experiment=tiny     # any overrides
    .venv/bin/python benchmarks/bench_run.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def reference_seconds(repeats: int = 3) -> float:
    """Median time of one training pass of ResNet-10-T over 512 random 64x64 crops (batch 64)."""
    import torch

    from defectops.training.models import create_model

    torch.manual_seed(0)
    model = create_model("aoi_resnet10t", num_classes=7, img_size=64)
    opt = torch.optim.AdamW(model.parameters())
    x, y = torch.rand(512, 3, 64, 64), torch.randint(0, 7, (512,))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, 512, 64):
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from defectops.pipelines.config import load_config
    from defectops.pipelines.runners.local import run_pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for `defectops run`")
    ap.add_argument("--json", type=Path, help="also write the timings as JSON here")
    args = ap.parse_args()
    console = Console()
    unit = reference_seconds()
    cfg = load_config(args.overrides)
    with tempfile.TemporaryDirectory(prefix="defectops-bench-") as home:
        t0 = time.perf_counter()
        ctx, outcomes = run_pipeline(cfg, home=Path(home))
        total = time.perf_counter() - t0
        summary = json.loads((ctx.root / "summary.json").read_text())
    table = Table(title=f"defectops run {' '.join(args.overrides) or '(default)'}: reference unit {unit:.2f} s")
    for col in ("step", "seconds", "x reference"):
        table.add_column(col, justify="left" if col == "step" else "right")
    for o in outcomes:
        table.add_row(o.name, f"{o.seconds:.1f}", f"{o.seconds / unit:.1f}")
    table.add_row("[bold]total[/]", f"{total:.1f}", f"{total / unit:.1f}")
    console.print(table)
    console.print(f"macro recall {summary['metrics']['macro_recall']:.4f}, aliases {summary['aliases']}")
    if args.json:
        args.json.write_text(json.dumps({"reference_seconds": unit, "total_seconds": total,
                                         "steps": {o.name: o.seconds for o in outcomes},
                                         "metrics": summary["metrics"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
