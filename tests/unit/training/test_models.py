"""Every registered model builds from scratch, runs on crops and exports to ONNX with parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectops.serving.onnx_export import export_onnx, onnx_logits, onnx_session, parity
from defectops.training.models import MODELS, TTA_VIEWS, create_model
from defectops.training.models.classifier import single_view


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


@pytest.mark.parametrize("tta", sorted(TTA_VIEWS))
def test_tta_is_the_mean_probability_of_its_views_and_exports(tta: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("aoi_resnet10t", num_classes=7, img_size=32, tta=tta).eval()
    views = TTA_VIEWS[tta]
    assert len(set(views)) == len(views) and views[0] == (0, False)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        crops = [torch.rot90(torch.flip(x, (3,)) if mirrored else x, turns, (2, 3)) for turns, mirrored in views]
        expected = torch.stack([model.forward_single(c).softmax(1) for c in crops]).mean(0)
        got = model(x)
    assert torch.allclose(got.softmax(1), expected, atol=1e-6)
    if tta == "none":
        assert torch.equal(got, model.forward_single(x))
    path = export_onnx(model, tmp_path / "m.onnx", input_shape=(3, 32, 32))
    p = parity(got.numpy(), onnx_logits(onnx_session(path), x.numpy()))
    assert p.top1_agreement == 1.0
    assert p.max_abs_logit_diff < 1e-4
    model.train()  # training always sees the crop itself
    assert torch.allclose(model(x), model.forward_single(x))


@pytest.mark.parametrize("tta", ["rot4", "d8"])
def test_tta_over_a_group_of_views_is_invariant_to_them(tta: str) -> None:
    torch.manual_seed(1)
    model = create_model("aoi_resnet10t", num_classes=7, img_size=32, tta=tta).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).softmax(1)
        assert torch.allclose(model(torch.rot90(x, 1, (2, 3))).softmax(1), ref, atol=1e-5)
        assert not torch.allclose(model.forward_single(torch.rot90(x, 1, (2, 3))).softmax(1),
                                  model.forward_single(x).softmax(1), atol=1e-5)
        if tta == "d8":
            assert torch.allclose(model(torch.flip(x, (2,))).softmax(1), ref, atol=1e-5)


def test_tta_errors_and_models_pickled_before_tta() -> None:
    with pytest.raises(ValueError, match="model.tta"):
        create_model("aoi_resnet10t", num_classes=2, tta="rot3")
    model = create_model("aoi_resnet10t", num_classes=2, tta="rot4").eval()
    with pytest.raises(ValueError, match="square"):
        model(torch.rand(1, 3, 32, 48))
    flipped = create_model("aoi_resnet10t", num_classes=2, tta="hflip").eval()
    assert flipped(torch.rand(1, 3, 32, 48)).shape == (1, 2)  # a mirror image keeps the shape
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), single_view(model):
        assert torch.equal(model(x), model.forward_single(x))
    assert len(model.views) == 4  # restored after the block
    with single_view(torch.nn.Identity()):  # any other module is left alone
        pass
    del model.views  # what unpickling a DefectClassifier saved before TTA existed gives
    with torch.no_grad():
        assert torch.equal(model(x), model.forward_single(x))
