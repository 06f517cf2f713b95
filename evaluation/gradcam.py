"""Grad-CAM (Selvaraju et al., 2017) for the crop classifiers: where in a crop the model looked for its decision.

The target layer is chosen per model family (the registry in ``training.models`` records it). Crops are small (64 px),
so the last stage of a CNN is only 2x2: Grad-CAM uses the stage before it (stride 16, 4x4 at 64 px) — a ResNet's
``layer3``, a MobileNetV3's block 3, an EfficientNet's block 4 — and the last transformer block of a ViT (tokens
reshaped to the patch grid).
``grad_cam`` is the only function here that runs the model; ``overlay`` is pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectops.training.models import DefectClassifier


def target_layer(model: DefectClassifier, family: str) -> nn.Module:
    """The layer whose activations Grad-CAM weighs, for a model family of the registry."""
    b: Any = model.backbone
    layer: nn.Module
    if family == "resnet":
        layer = b.layer3[-1]
    elif family == "mobilenet":
        layer = b.blocks[3]
    elif family == "efficientnet":
        layer = b.blocks[4]  # the last stride-16 stage
    elif family == "vit":
        layer = b.blocks[-1]
    else:
        raise ValueError(f"no Grad-CAM target layer known for model family {family!r}")
    return layer


def _to_map(act: torch.Tensor, model: DefectClassifier, family: str) -> torch.Tensor:
    """(N, C, h, w) activations; ViT tokens (N, T, D) become a grid without the prefix (class) tokens."""
    if family != "vit":
        return act
    prefix = int(getattr(model.backbone, "num_prefix_tokens", 1))
    tokens = act[:, prefix:, :]
    side = round(tokens.shape[1] ** 0.5)
    return tokens.transpose(1, 2).reshape(act.shape[0], act.shape[2], side, side)


def grad_cam(model: DefectClassifier, family: str, images: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] of ``classes[i]`` for ``images`` (N, C, H, W) in [0, 1], eval mode."""
    layer = target_layer(model, family)
    store: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
        out = out[0] if isinstance(out, tuple) else out
        out.retain_grad()
        store["act"] = out

    handle = layer.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        x = images.detach().clone().requires_grad_(True)
        logits = model.forward_single(x)  # one view: the hooked activations are this crop's
        idx = torch.as_tensor(list(classes), dtype=torch.long)
        model.zero_grad(set_to_none=True)
        logits.gather(1, idx[:, None]).sum().backward()  # type: ignore[no-untyped-call]
        act, grad = store["act"], store["act"].grad
        assert grad is not None
        act_map, grad_map = _to_map(act, model, family), _to_map(grad, model, family)
        weights = grad_map.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * act_map).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        lo = cam.flatten(1).min(1).values[:, None, None]
        hi = cam.flatten(1).max(1).values[:, None, None]
        cam = (cam - lo) / (hi - lo).clamp_min(1e-8)
        return cam.detach().numpy().astype(np.float32)
    finally:
        handle.remove()
        model.train(was_training)
        model.zero_grad(set_to_none=True)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Pure: blend a jet-coloured ``cam`` (H, W) in [0, 1] over a uint8 RGB ``image`` (H, W, 3)."""
    if image.shape[:2] != cam.shape:
        raise ValueError(f"image {image.shape[:2]} and cam {cam.shape} differ in size")
    c = np.clip(cam, 0.0, 1.0)
    jet = np.stack([np.clip(1.5 - np.abs(4 * c - 3), 0, 1), np.clip(1.5 - np.abs(4 * c - 2), 0, 1),
                    np.clip(1.5 - np.abs(4 * c - 1), 0, 1)], axis=-1)
    out = (1 - alpha) * image.astype(np.float32) / 255.0 + alpha * jet
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
