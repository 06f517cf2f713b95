"""Training throughput on the CPU against an accelerator (when one is present), same data, same process.

Builds candidate crops from synthetic boards, trains the default model for a few epochs on the CPU (the baseline)
and on CUDA if available, and prints images/s, the speed-up ratio, test macro recall for both, and ONNX parity of
the accelerator-trained model. Needs no MLflow or Hydra, so it runs on a bare GPU machine.

    .venv/bin/python benchmarks/bench_train_device.py --boards 120 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from defectops.core.taxonomy import DEFECT_TYPES
from defectops.evaluation.metrics import classification_metrics
from defectops.serving.onnx_export import export_onnx, onnx_logits, onnx_session, parity
from defectops.training.config import CandidateConfig, ModelConfig, SplitConfig, TrainConfig
from defectops.training.crops import build_crops
from defectops.training.data import load_split, to_tensor
from defectops.training.engine import predict_logits, softmax
from defectops.training.snapshot import deeppcb_samples, write_snapshot
from defectops.training.synth import write_deeppcb_root
from defectops.training.trainer import fit

CLASSES = ["false_call", *DEFECT_TYPES]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boards", type=int, default=120)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--model", default="aoi_resnet10t")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out: dict[str, object] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_deeppcb_root(root / "boards", args.boards, seed=0, nuisance=(4, 10))
        samples = deeppcb_samples(root / "boards", "trainval.txt", SplitConfig(val=0.15, test=0.2, seed=0),
                                  source="bench")
        snap = write_snapshot(root / "snap", samples, CLASSES, files_root=root / "boards")
        crops, _ = build_crops(snap, range(len(samples)), root / "crops", CandidateConfig(), CLASSES, "false_call")
        xtr, ytr, _ = load_split(crops, "train")
        xte, yte, _ = load_split(crops, "test")
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for dev in devices:
            cfg = TrainConfig(epochs=args.epochs, device=dev)
            t0 = time.perf_counter()
            res = fit(xtr, ytr, CLASSES, ModelConfig(name=args.model), cfg, root / f"ckpt-{dev}", seed=0)
            secs = time.perf_counter() - t0
            logits = predict_logits(res.model, to_tensor(xte), torch.device("cpu"))
            m = classification_metrics(yte, softmax(logits), CLASSES, "false_call")
            out[dev] = {"seconds": secs, "images_per_s": args.epochs * len(ytr) / secs, "macro_recall": m.macro_recall}
            if dev == "cuda":
                path = export_onnx(res.model, root / "m.onnx", input_shape=(3, xte.shape[1], xte.shape[2]))
                out["cuda_onnx_parity"] = parity(logits, onnx_logits(onnx_session(path), to_tensor(xte).numpy()))\
                    .to_dict()
        if "cuda" in out:
            out["speedup_cuda_vs_cpu"] = out["cuda"]["images_per_s"] / out["cpu"]["images_per_s"]  # type: ignore[index]
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
