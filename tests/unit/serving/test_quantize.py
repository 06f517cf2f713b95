"""INT8 quantization: stratified calibration, the publish verdict, and the quantized export of the tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import TinyRun

from defectops.serving.onnx_export import export_onnx, onnx_logits, onnx_session, read_metadata
from defectops.serving.quantize import calibration_sample, int8_verdict, quantize_int8
from defectops.training.models import create_model


def test_calibration_sample_is_stratified_and_seeded() -> None:
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    idx = calibration_sample(labels, 100, seed=3)
    assert len(idx) == len(set(idx.tolist())) <= 100
    counts = np.bincount(labels[idx], minlength=3)
    assert counts[2] >= 1 and counts[1] >= 9 and counts[0] >= 85  # the rare class is not left out
    assert np.array_equal(idx, calibration_sample(labels, 100, seed=3))
    assert not np.array_equal(idx, calibration_sample(labels, 100, seed=4))
    assert len(calibration_sample(labels, 0)) == 0 and len(calibration_sample(np.array([]), 5)) == 0
    assert len(calibration_sample(np.array([1, 1, 2]), 10)) == 3


def test_int8_verdict() -> None:
    ok = int8_verdict(0.95, 0.948, 0.99, [], 0.005)
    assert ok.publish and ok.reasons == () and ok.macro_recall_drop == pytest.approx(0.002)
    drop = int8_verdict(0.95, 0.90, 0.9, [], 0.005)
    assert not drop.publish and "5.00 points" in drop.reasons[0] and "0.50 points" in drop.reasons[0]
    gate = int8_verdict(0.95, 0.96, 0.99, ["recall[short] (0.80 < 0.90)"], 0.005)
    assert not gate.publish and gate.reasons == ("gate recall[short] (0.80 < 0.90) failed",)
    assert not int8_verdict(0.95, float("nan"), 0.0, [], 0.005).publish
    assert json.loads(json.dumps(ok.to_dict()))["publish"] is True


def test_quantize_int8_keeps_metadata_and_agrees(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("aoi_resnet10t_slim", num_classes=3, img_size=32).eval()
    fp32 = export_onnx(model, tmp_path / "m.onnx", input_shape=(3, 32, 32), metadata={"defectops.classes": "[1]"})
    rng = np.random.default_rng(0)
    x = rng.random((64, 3, 32, 32), dtype=np.float32)
    out = quantize_int8(fp32, tmp_path / "m.int8.onnx", x[:32], extra_metadata={"defectops.precision": "int8"})
    meta = read_metadata(out)
    assert meta["defectops.classes"] == "[1]" and meta["defectops.precision"] == "int8"
    assert not list(tmp_path.glob(".*"))  # no temp file left beside it
    ref, q = onnx_logits(onnx_session(fp32), x), onnx_logits(onnx_session(out), x)
    assert q.shape == ref.shape and np.isfinite(q).all()
    assert np.abs(q - ref).max() < 0.25 * (np.abs(ref).max() + 1e-6)  # quantized, not broken
    with pytest.raises(ValueError, match="calibration method"):
        quantize_int8(fp32, tmp_path / "x.onnx", x, method="bogus")
    with pytest.raises(ValueError, match="at least one sample"):
        quantize_int8(fp32, tmp_path / "x.onnx", x[:0])


def test_tiny_run_int8_is_verified_and_recorded(tiny_run: TinyRun) -> None:
    from defectops.registry.mlflow_registry import client as make_client

    root = Path(tiny_run.root)
    report = json.loads((root / "export" / "int8.json").read_text())
    assert (root / "export" / "model.int8.onnx").is_file()
    assert set(report) >= {"publish", "macro_recall_drop", "reasons", "parity", "gates", "metrics"}
    assert report["macro_recall_drop"] == pytest.approx(report["reference_macro_recall"] - report["macro_recall"])
    assert report["publish"] == (not report["reasons"])
    c = make_client(f"sqlite:///{Path(tiny_run.home) / 'mlflow.db'}")
    mv = c.get_model_version(tiny_run.cfg.registry.model_name, "1")
    assert mv.tags["defectops.int8_published"] == str(report["publish"]).lower()
    logged = {a.path for a in c.list_artifacts(mv.run_id, "onnx")}
    assert "onnx/int8.json" in logged
    assert ("onnx/model.int8.onnx" in logged) == report["publish"]


def test_quantize_int8_op_types_quantizes_only_those_nodes(tmp_path: Path) -> None:
    """``op_types=["Conv"]`` (the anomaly models' backbone recipe): the convolution gets QDQ, the MatMul after it stays
    FP32; ``exclude_nodes`` keeps a named node FP32; without either, both are quantized (the classifiers' export)."""
    import onnx

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.proj = torch.nn.Parameter(torch.randn(4 * 8 * 8, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x)).flatten(1) @ self.proj

    torch.manual_seed(0)
    fp32 = export_onnx(Tiny().eval(), tmp_path / "t.onnx", input_shape=(3, 8, 8))
    x = np.random.default_rng(0).random((8, 3, 8, 8), dtype=np.float32)

    def quantized_inputs(path: Path) -> dict[str, bool]:
        """op type -> whether its inputs come through DequantizeLinear."""
        graph = onnx.load(str(path)).graph
        dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        return {n.op_type: any(i in dq for i in n.input) for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm")}

    conv_only = quantized_inputs(quantize_int8(fp32, tmp_path / "c.onnx", x, op_types=["Conv"]))
    assert conv_only["Conv"] and not any(v for k, v in conv_only.items() if k != "Conv")
    everything = quantized_inputs(quantize_int8(fp32, tmp_path / "a.onnx", x))
    assert all(everything.values()) and len(everything) == 2
    conv_name = next(n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv")
    none = quantized_inputs(quantize_int8(fp32, tmp_path / "n.onnx", x, op_types=["Conv"], exclude_nodes=[conv_name]))
    assert not any(none.values())
