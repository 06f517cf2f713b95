"""Penultimate-layer embeddings (and logits) of any DefectOps classifier, for drift profiles and checks."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.inference_mode()
def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings (N, D), logits (N, K))`` float32 for float images (N, C, H, W) in [0, 1], in eval mode, on CPU.

    Works for a :class:`~training.models.DefectClassifier` (its ``features``: timm ``forward_features`` +
    ``forward_head(pre_logits=True)``) and for any module with a timm ``backbone`` or timm model itself; the logits
    are computed from the same features, so one pass gives both.
    """
    model.eval()
    backbone: nn.Module = getattr(model, "backbone", model)
    mean = getattr(model, "mean", None)
    std = getattr(model, "std", None)
    embs, logits = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float()
        if mean is not None and std is not None and backbone is not model:
            x = (x - mean) / std
        feats = backbone.forward_features(x)  # type: ignore[operator]
        embs.append(backbone.forward_head(feats, pre_logits=True).float().reshape(len(x), -1))  # type: ignore[operator]
        logits.append(backbone.forward_head(feats).float())  # type: ignore[operator]
    if not embs:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(embs).numpy(), torch.cat(logits).numpy()
