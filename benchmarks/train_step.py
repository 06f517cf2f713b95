"""Training-step throughput of the crop classifier under each `train.precision` x `train.channels_last` setting.

Runs :func:`training.engine.train_one_epoch` (the code `defectops run` trains with) over the same fixed random crops
for every setting, in alternating rounds in one process, and prints crops/s and the ratio to the baseline
(``precision=fp32``, ``channels_last=false``) measured in the same round. The crops are random, so only speed is
measured here; what bf16 does to accuracy is measured by a real run (`docs/deeppcb.md`).

    .venv/bin/python benchmarks/train_step.py                      # aoi_resnet10t, 64 px, batch 128, 2 threads
    .venv/bin/python benchmarks/train_step.py --model aoi_effnet_lite0 --size 96 --batch 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset

from defectops.training.engine import train_one_epoch
from defectops.training.losses import create_loss
from defectops.training.models import create_model
from defectops.training.trainer import PRECISIONS

SETTINGS = [(p, cl) for p in PRECISIONS for cl in (False, True)]


def crops_per_s(model_name: str, size: int, batch: int, batches: int, precision: str, channels_last: bool) -> float:
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=7, img_size=size, pretrained=False)
    model = model.to(memory_format=torch.channels_last if channels_last else torch.preserve_format)
    x, y = torch.rand(batch * batches, 3, size, size), torch.randint(0, 7, (batch * batches,))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    dtype = PRECISIONS[precision]
    warm = DataLoader(TensorDataset(x[:batch], y[:batch]), batch_size=batch)
    for data in (warm, loader):  # a warm-up batch, then the timed pass
        t0 = time.perf_counter()
        train_one_epoch(model, data, create_loss("focal"), opt, sched, torch.device("cpu"), 0, autocast_dtype=dtype,
                        channels_last=channels_last)
    return len(x) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="aoi_resnet10t")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=12, help="batches per timed pass")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    runs: dict[tuple[str, bool], list[float]] = {s: [] for s in SETTINGS}
    ratios: dict[tuple[str, bool], list[float]] = {s: [] for s in SETTINGS}
    for _ in range(a.rounds):
        base = None
        for s in SETTINGS:
            v = crops_per_s(a.model, a.size, a.batch, a.batches, *s)
            base = v if base is None else base
            runs[s].append(v)
            ratios[s].append(v / base)
    t = Table(title=f"training step, {a.model} {a.size} px, batch {a.batch}, {a.threads} threads "
                    f"(median of {a.rounds} rounds)")
    for col in ("precision", "channels_last", "crops/s", "x fp32 (same round)"):
        t.add_column(col, justify="right")
    out = []
    for (p, cl) in SETTINGS:
        med, ratio = statistics.median(runs[(p, cl)]), statistics.median(ratios[(p, cl)])
        t.add_row(p, str(cl).lower(), f"{med:.0f}", f"{ratio:.2f}")
        out.append({"precision": p, "channels_last": cl, "crops_per_s": med, "ratio": ratio})
    Console().print(t)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
