"""`defectops drift check` on 1,000 candidate crops: wall time of the whole command (load the model and its
reference profile, decode the PNGs, image statistics, embeddings, the 15 tests with 2,000 MMD permutations, the HTML
report), which must stay under 60 s on 2 CPU cores. Printed with a same-process baseline: plain classification of
the same crops (PyTorch logits), so the ratio tells what drift adds to inference.

Uses the tiny run (trained in a temporary home) unless --run-root names a run with a drift profile (``drift/``).

    .venv/bin/python benchmarks/bench_drift.py
    .venv/bin/python benchmarks/bench_drift.py --run-root defectops-home/runs/<run-id> --crops 1000 --json out.json
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

BUDGET_S = 60.0


def main() -> int:
    import cv2
    import numpy as np
    import torch
    from typer.testing import CliRunner

    from defectops.pipelines.cli import app
    from defectops.pipelines.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-root", type=Path, help="an existing run root with drift/ (default: a tiny run)")
    ap.add_argument("--crops", type=int, default=1000, help="crops in the checked batch (default 1000)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        work = Path(tmp)
        root = args.run_root
        if root is None:
            from defectops.pipelines.runners.local import run_pipeline

            ctx, _ = run_pipeline(load_config(["+experiment=tiny"]), home=work / "home")
            root = ctx.root
        cfg = load_config(["+experiment=tiny"])
        from defectops.training.crops import candidate_params, propose
        from defectops.training.synth import generate_boards

        s, c = cfg.data.synth, cfg.data.candidates
        crops: list[np.ndarray] = []
        for b in generate_boards(max(args.crops // 5, 10), 4242, size=s.size, defects=tuple(s.defects),
                                 nuisance=tuple(s.nuisance)):
            crops.append(propose(b.template, b.tested, candidate_params(c), c.crop_size, c.context)[1])
            if sum(len(x) for x in crops) >= args.crops:
                break
        batch = np.concatenate(crops)[:args.crops]
        folder = work / "crops"
        folder.mkdir()
        for i, x in enumerate(batch):
            cv2.imwrite(str(folder / f"{i:05d}.png"), np.ascontiguousarray(x[:, :, ::-1]))

        from defectops.training.data import to_tensor
        from defectops.training.engine import predict_logits
        from defectops.training.trainer import load_trained_model

        net, _ = load_trained_model(Path(root) / "train" / "model.pt")
        t0 = time.perf_counter()
        predict_logits(net, to_tensor(batch), torch.device("cpu"))
        baseline = time.perf_counter() - t0

        os.environ.setdefault("DEFECTOPS_HOME", str(work / "home"))
        t0 = time.perf_counter()
        r = CliRunner().invoke(app, ["drift", "check", "--model", str(root), "--images", str(folder), "--json",
                                     "--report", str(work / "drift.html")])
        seconds = time.perf_counter() - t0
        if r.exit_code not in (0, 3):
            print(r.output)
            return 1
        doc = json.loads(r.stdout)
    result = {"crops": int(doc["n_batch"]), "seconds": round(seconds, 2), "budget_s": BUDGET_S,
              "baseline_classify_s": round(baseline, 2), "ratio_to_classify": round(seconds / max(baseline, 1e-9), 1),
              "threads": args.threads, "decision": doc["decision"], "within_budget": seconds < BUDGET_S}
    print(f"drift check of {result['crops']} crops: {seconds:.1f} s (budget {BUDGET_S:.0f} s, {args.threads} "
          f"threads); plain classification of the same crops {baseline:.2f} s: {result['ratio_to_classify']}x; "
          f"decision: {doc['decision']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["within_budget"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
