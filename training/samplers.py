"""Class-balanced sampling: per-sample weights from class counts, and a seeded weighted sampler.

Modes: ``none`` (uniform), ``inverse_frequency`` (each class drawn equally often in expectation) and
``effective_number`` (Cui et al., 2019: weight ``(1 - beta) / (1 - beta ** n_c)``, between the two).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

SAMPLER_MODES = ("none", "inverse_frequency", "effective_number")


def class_weights(counts: np.ndarray, mode: str, beta: float = 0.999) -> np.ndarray:
    """Weight per class (classes with zero count get 0), normalised so the weights over present classes sum to 1."""
    counts = np.asarray(counts, dtype=np.float64)
    if mode not in SAMPLER_MODES:
        raise ValueError(f"unknown sampler {mode!r}: choose one of {', '.join(SAMPLER_MODES)} (train.sampler=...)")
    present = counts > 0
    w = np.zeros_like(counts)
    if mode == "none":
        w[present] = counts[present]
    elif mode == "inverse_frequency":
        w[present] = 1.0
    else:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"effective-number beta must be in [0, 1), got {beta}")
        w[present] = counts[present] * (1.0 - beta) / (1.0 - np.power(beta, counts[present]))
    total = w.sum()
    return w / total if total > 0 else w


def sample_weights(labels: np.ndarray, num_classes: int, mode: str, beta: float = 0.999) -> np.ndarray:
    """Per-sample weights so that class ``c`` is drawn with probability ``class_weights(...)[c]``."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    cw = class_weights(counts, mode, beta)
    per_sample = np.zeros(num_classes)
    np.divide(cw, counts, out=per_sample, where=counts > 0)
    return per_sample[labels]


class BalancedSampler(Sampler[int]):
    """Draws ``len(labels)`` indices with replacement per epoch; the draw depends only on ``seed`` and the epoch."""

    def __init__(self, labels: np.ndarray, num_classes: int, mode: str, *, beta: float = 0.999, seed: int = 0,
                 num_samples: int | None = None) -> None:
        self.weights = torch.as_tensor(sample_weights(labels, num_classes, mode, beta), dtype=torch.double)
        self.num_samples = int(num_samples if num_samples is not None else len(labels))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g).tolist()

    def __len__(self) -> int:
        return self.num_samples
