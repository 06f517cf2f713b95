"""Class-balanced sampling: per-sample weights from class counts, and a seeded weighted sampler.

Modes: ``none`` (uniform), ``inverse_frequency`` (each class drawn equally often in expectation) and
``effective_number`` (Cui et al., 2019: weight ``(1 - beta) / (1 - beta ** n_c)``, between the two).

Under DDP, :class:`DistributedBalancedSampler` gives each rank a strided shard of the very draw a single process makes
for the epoch, so the union over ranks is the single-process epoch and, with a per-rank batch of
``batch_size / world_size``, global batch ``k`` holds the same samples as the single-process batch ``k``.
"""

from __future__ import annotations

import math
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
    return np.asarray(per_sample[labels])


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


class DistributedBalancedSampler(BalancedSampler):
    """Rank ``rank``'s shard of :class:`BalancedSampler`'s draw for the epoch (DDP).

    Every rank draws the same seeded weighted sample for ``(seed, epoch)`` and keeps positions ``rank, rank + W,
    rank + 2W ...`` (``W = num_replicas``). Shards are equally long: with ``drop_last`` the draw is cut to a multiple
    of ``W``, otherwise it is padded by wrapping around (as ``torch.utils.data.DistributedSampler`` does). The
    union of the shards is therefore the single-process draw (its prefix with ``drop_last``; plus the padding without).
    """

    def __init__(self, labels: np.ndarray, num_classes: int, mode: str, *, num_replicas: int, rank: int,
                 beta: float = 0.999, seed: int = 0, num_samples: int | None = None, drop_last: bool = False) -> None:
        super().__init__(labels, num_classes, mode, beta=beta, seed=seed, num_samples=num_samples)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        n = self.num_samples
        self.total_size = (n // num_replicas if drop_last else math.ceil(n / num_replicas)) * num_replicas

    def __iter__(self) -> Iterator[int]:
        draw = list(super().__iter__())
        if len(draw) < self.total_size and draw:
            draw += (draw * math.ceil(self.total_size / len(draw)))[:self.total_size - len(draw)]
        yield from draw[self.rank:self.total_size:self.num_replicas]

    def __len__(self) -> int:
        return self.total_size // self.num_replicas
