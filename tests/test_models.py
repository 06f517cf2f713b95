"""Every registered model builds from scratch, runs on crops and exports to ONNX with parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.onnx_export import export_onnx, onnx_logits, onnx_session, parity
from training.models import MODELS, create_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_forward_and_features(name: str) -> None:
    model = create_model(name, num_classes=7, in_chans=3, img_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        assert model.features(x).ndim == 2


@pytest.mark.parametrize("name", sorted(MODELS))
def test_onnx_export_parity_with_dynamic_batch(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, img_size=32).eval()
    path = export_onnx(model, tmp_path / "m.onnx", input_shape=(3, 32, 32))
    sess = onnx_session(path)
    for batch in (1, 5):
        x = torch.rand(batch, 3, 32, 32)
        with torch.no_grad():
            ref = model(x).numpy()
        got = onnx_logits(sess, x.numpy())
        p = parity(ref, got)
        assert p.top1_agreement == 1.0
        assert p.max_abs_logit_diff < 1e-3


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="model.name"):
        create_model("resnet9000", num_classes=2)


def test_parity_is_pure_and_checks_shapes() -> None:
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.9, 0.0], [1.0, 0.5]])
    p = parity(a, b)
    assert p.top1_agreement == 0.5
    assert p.max_abs_logit_diff == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes"):
        parity(a, b[:1])
