"""Loss registry: ``create_loss(name, **kw)`` over typed ``nn.Module`` losses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from defectops.training.losses.focal import FocalLoss

LOSSES: dict[str, Callable[..., nn.Module]] = {
    "focal": FocalLoss,
    "cross_entropy": lambda alpha=None, label_smoothing=0.0, **_: FocalLoss(0.0, alpha, label_smoothing),
}


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(sorted(LOSSES))} (train.loss.name=...)")
    return LOSSES[name](**kwargs)


__all__ = ["LOSSES", "FocalLoss", "create_loss"]
