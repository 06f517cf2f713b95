"""Grad-CAM for every registered model family, and that it points at what decided the class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.gradcam import grad_cam, overlay, target_layer
from training.models import MODELS, create_model, model_family


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cam_shape_and_range(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, img_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    cam = grad_cam(model, model_family(name), x, [0, 2])
    assert cam.shape == (2, 64, 64)
    assert np.isfinite(cam).all()
    assert cam.min() >= 0.0
    assert cam.max() <= 1.0
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_cam_points_at_the_evidence() -> None:
    """Train a small ResNet to tell a bright square (class 1) from plain noise (class 0): on an image with the square
    top-left, the CAM of class 1 must be hotter there than in the opposite quadrant."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 3, 64, 64, generator=g) * 0.2
    y = torch.randint(0, 2, (256,), generator=g)
    for i in torch.nonzero(y == 1).flatten().tolist():
        r, c = torch.randint(0, 48, (2,), generator=g).tolist()
        x[i, :, r:r + 16, c:c + 16] = 1.0
    model = create_model("aoi_resnet10t_slim", num_classes=2, img_size=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(3):
        for i in range(0, 256, 32):
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    probe = torch.rand(4, 3, 64, 64, generator=g) * 0.2
    probe[:, :, 8:24, 8:24] = 1.0
    cam = grad_cam(model, "resnet", probe, [1, 1, 1, 1])
    for c in cam:
        assert c[:32, :32].mean() > c[32:, 32:].mean()


def test_overlay_is_pure_and_checks_shapes() -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    cam = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    out = overlay(img, cam)
    assert out.shape == (8, 8, 3)
    assert out.dtype == np.uint8
    assert out[7, 7, 0] > out[0, 0, 0]  # hot end is red
    assert (img == 0).all()
    with pytest.raises(ValueError, match="differ"):
        overlay(img, cam[:4])


def test_unknown_family() -> None:
    with pytest.raises(ValueError, match="family"):
        target_layer(create_model("aoi_resnet10t", num_classes=2), "alexnet")
