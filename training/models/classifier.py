"""The crop classifier: input normalisation folded into a plain ``nn.Module`` around a timm backbone.

Normalisation lives inside the module so that the exported ONNX graph takes float32 crops in [0, 1] and every
consumer (onnxruntime, Triton, the review app) preprocesses identically.
"""

from __future__ import annotations

import torch
from torch import nn


class DefectClassifier(nn.Module):
    """``logits = backbone((x - mean) / std)`` for ``x`` of shape (N, C, H, W) in [0, 1]."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, backbone: nn.Module, in_chans: int, mean: float = 0.5, std: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.full((1, in_chans, 1, 1), mean))
        self.register_buffer("std", torch.full((1, in_chans, 1, 1), std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer embedding (pooled), for drift profiles and retrieval."""
        feats = self.backbone.forward_features((x - self.mean) / self.std)  # type: ignore[operator]
        return self.backbone.forward_head(feats, pre_logits=True)  # type: ignore[operator]
