"""Focal loss against its formula, and the loss registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from defectops.training.losses import LOSSES, FocalLoss, create_loss


def _reference(logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: list[float] | None) -> float:
    total = 0.0
    for row, t in zip(logits.tolist(), target.tolist(), strict=True):
        z = max(row)
        denom = sum(math.exp(v - z) for v in row)
        p = math.exp(row[t] - z) / denom
        a = alpha[t] if alpha else 1.0
        total += -a * (1 - p) ** gamma * math.log(p)
    return total / len(target)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [None, [0.25, 1.0, 2.0, 0.5]])
def test_focal_loss_matches_formula(gamma: float, alpha: list[float] | None) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 4, generator=g) * 3
    target = torch.randint(0, 4, (16,), generator=g)
    got = FocalLoss(gamma=gamma, alpha=alpha)(logits, target).item()
    assert got == pytest.approx(_reference(logits, target, gamma, alpha), rel=1e-5)


def test_gamma_zero_equals_cross_entropy() -> None:
    logits = torch.randn(32, 7, generator=torch.Generator().manual_seed(1))
    target = torch.arange(32) % 7
    assert FocalLoss(gamma=0.0)(logits, target).item() == pytest.approx(F.cross_entropy(logits, target).item(),
                                                                          rel=1e-6)


def test_focal_down_weights_easy_examples() -> None:
    easy = torch.tensor([[10.0, 0.0]])
    hard = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([0])
    ratio_focal = FocalLoss(gamma=2.0)(easy, t) / FocalLoss(gamma=2.0)(hard, t)
    ratio_ce = F.cross_entropy(easy, t) / F.cross_entropy(hard, t)
    assert ratio_focal < ratio_ce


def test_focal_gradient_is_finite_for_confident_logits() -> None:
    logits = torch.tensor([[50.0, -50.0, 0.0]], requires_grad=True)
    FocalLoss(gamma=2.0)(logits, torch.tensor([0])).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_registry_builds_every_loss(name: str) -> None:
    loss = create_loss(name, gamma=1.0, alpha=None, label_smoothing=0.0)
    value = loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    assert torch.isfinite(value)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        create_loss("nope")
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1)
    with pytest.raises(ValueError, match="alpha"):
        FocalLoss(alpha=[1.0, 2.0])(torch.randn(2, 3), torch.tensor([0, 1]))
