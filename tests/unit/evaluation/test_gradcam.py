"""Grad-CAM for every registered model family, and that it points at what decided the class."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import TinyRun

from defectops.evaluation.gradcam import grad_cam, overlay, target_layer
from defectops.training.candidates import MIN_CROP_SIDE
from defectops.training.models import MODELS, create_model, model_family


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


def _box_in_crop(box: Sequence[int], size: int, context: float) -> tuple[float, float, float, float]:
    """Where a candidate box lands in its crop (the geometry of ``training.candidates.crop``), in crop pixels."""
    x1, y1, x2, y2 = box
    side = max(MIN_CROP_SIDE, round(max(x2 - x1 + 1, y2 - y1 + 1) * context))
    ox, oy = round((x1 + x2 + 1) / 2 - side / 2), round((y1 + y2 + 1) / 2 - side / 2)
    k = size / side
    return (x1 - ox) * k, (y1 - oy) * k, (x2 + 1 - ox) * k, (y2 + 1 - oy) * k


def test_cam_peak_falls_inside_the_defect_box(tiny_run: TinyRun) -> None:
    """On the synthetic boards of the tiny run: for the defect crops (all parts) that the trained model
    classifies correctly, the Grad-CAM peak of the true class must fall inside the defect's candidate box for most of
    them (measured: 11 of 12; the floor leaves room for the 2-epoch model of the tiny config)."""
    from defectops.core.layout import RUN
    from defectops.training.data import load_split, to_tensor
    from defectops.training.snapshot import load_snapshot
    from defectops.training.trainer import load_trained_model

    root = Path(tiny_run.root)
    cand = tiny_run.cfg.data.candidates
    net, state = load_trained_model(root / RUN.model)
    snap = load_snapshot(root / RUN.crops)
    good = snap.classes.index(tiny_run.cfg.data.good_class)
    by_path = {s["path"]: s for s in snap.samples}
    parts = [load_split(snap, split) for split in ("train", "val", "test")]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    rows = [by_path[path] for p in parts for path in p[2]]
    keep = np.flatnonzero(y != good)
    x, y, rows = x[keep], y[keep], [rows[i] for i in keep]
    with torch.no_grad():
        pred = net(to_tensor(x)).argmax(1).numpy()
    ok = np.flatnonzero(pred == y)
    assert len(ok) >= 10, f"only {len(ok)} correctly classified defect crops; the tiny run is too weak to judge"
    cams = grad_cam(net, model_family(str(state["model_name"])), to_tensor(x[ok]), y[ok].tolist())
    inside = []
    for i, cam in zip(ok, cams, strict=True):
        py, px = np.unravel_index(int(cam.argmax()), cam.shape)
        bx1, by1, bx2, by2 = _box_in_crop(rows[i]["box"], cand.crop_size, cand.context)
        inside.append(bx1 - 1 <= px + 0.5 <= bx2 + 1 and by1 - 1 <= py + 0.5 <= by2 + 1)
    print(f"Grad-CAM peak inside the defect box: {np.mean(inside):.3f} of {len(ok)} correctly classified defect crops")
    assert np.mean(inside) >= 0.6, f"CAM peak inside the defect box for {np.mean(inside):.2f} of {len(ok)} crops"


def test_cam_of_a_tta_model_explains_the_crop_itself() -> None:
    torch.manual_seed(0)
    plain = create_model("aoi_resnet10t", num_classes=3, img_size=32).eval()
    tta = create_model("aoi_resnet10t", num_classes=3, img_size=32, tta="d8").eval()
    tta.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert np.allclose(grad_cam(tta, "resnet", x, [0, 1]), grad_cam(plain, "resnet", x, [0, 1]), atol=1e-5)
