"""Multi-class focal loss (Lin et al., 2017) with optional per-class alpha.

``FL = -alpha[y] * (1 - p_y) ** gamma * log(p_y)``; with ``gamma = 0`` and no alpha it equals cross-entropy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FocalLoss(nn.Module):
    """Focal loss over logits of shape (N, C) and integer targets of shape (N,), mean-reduced."""

    alpha: torch.Tensor | None

    def __init__(self, gamma: float = 2.0, alpha: Sequence[float] | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal loss gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        if alpha is not None:
            self.register_buffer("alpha", torch.as_tensor(list(alpha), dtype=torch.float32))
        else:
            self.alpha = None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=1)
        if self.label_smoothing > 0:
            n = logits.shape[1]
            smooth = torch.full_like(log_p, self.label_smoothing / n)
            smooth.scatter_(1, target[:, None], 1.0 - self.label_smoothing + self.label_smoothing / n)
            log_pt = (smooth * log_p).sum(dim=1)
        else:
            log_pt = log_p.gather(1, target[:, None]).squeeze(1)
        pt = log_p.gather(1, target[:, None]).squeeze(1).exp()
        loss = -((1.0 - pt) ** self.gamma) * log_pt if self.gamma > 0 else -log_pt
        if self.alpha is not None:
            if self.alpha.numel() != logits.shape[1]:
                raise ValueError(f"focal loss alpha has {self.alpha.numel()} entries for {logits.shape[1]} classes")
            loss = loss * self.alpha[target]
        return loss.mean()
