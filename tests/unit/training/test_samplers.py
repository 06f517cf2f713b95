"""Class-balanced sampling: weights per mode and the balance actually drawn."""

from __future__ import annotations

import numpy as np
import pytest

from defectops.training.samplers import BalancedSampler, class_weights, sample_weights


def test_class_weights_modes() -> None:
    counts = np.array([900, 90, 10, 0])
    none = class_weights(counts, "none")
    assert none[:3] == pytest.approx(counts[:3] / 1000)
    inv = class_weights(counts, "inverse_frequency")
    assert inv[:3] == pytest.approx([1 / 3] * 3)
    assert inv[3] == 0.0
    beta = 0.99
    eff = class_weights(counts, "effective_number", beta)
    raw = counts[:3] * (1 - beta) / (1 - beta ** counts[:3])
    assert eff[:3] == pytest.approx(raw / raw.sum())
    # effective number lies between no balancing and full inverse frequency
    assert none[0] > eff[0] > inv[0]


def test_sample_weights_sum_to_class_weight() -> None:
    labels = np.array([0] * 50 + [1] * 5 + [2] * 1)
    w = sample_weights(labels, 3, "inverse_frequency")
    for c in range(3):
        assert w[labels == c].sum() == pytest.approx(1 / 3)


@pytest.mark.parametrize("mode", ["inverse_frequency", "effective_number"])
def test_sampler_draws_balanced_classes(mode: str) -> None:
    labels = np.array([0] * 5000 + [1] * 300 + [2] * 40 + [3] * 10)
    sampler = BalancedSampler(labels, 4, mode, beta=0.9, seed=3, num_samples=40_000)
    drawn = np.bincount(labels[list(sampler)], minlength=4) / 40_000
    expected = class_weights(np.bincount(labels), mode, 0.9)
    assert drawn == pytest.approx(expected, abs=0.01)
    if mode == "inverse_frequency":
        assert drawn.min() > 0.23


def test_sampler_is_deterministic_per_epoch() -> None:
    labels = np.array([0] * 100 + [1] * 10)
    a, b = BalancedSampler(labels, 2, "inverse_frequency", seed=1), BalancedSampler(labels, 2, "inverse_frequency",
                                                                                   seed=1)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    b.set_epoch(5)
    assert list(a) != list(b)


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match="train.sampler"):
        class_weights(np.array([1, 2]), "square_root")
