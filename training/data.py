"""Crop datasets for training and evaluation: images held in memory, albumentations for augmentation.

Crops are small (64x64x3 by default), so a split is decoded once into one uint8 array; a sample becomes a float32
CHW tensor in [0, 1] (the model normalises). Augmentation is seeded per epoch, so a resumed run draws exactly what an
uninterrupted one would.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from defectops.training.config import AugmentConfig
from defectops.training.snapshot import Snapshot


def load_split(snap: Snapshot, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every crop of ``split``: ``(images (N, H, W, 3) uint8, labels (N,) int64, relative paths)``."""
    index = {c: i for i, c in enumerate(snap.classes)}
    rows = [s for s in snap.samples if s["split"] == split]
    images, labels, paths = [], [], []
    for s in rows:
        img = cv2.imread(str(snap.file(s["path"])), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"crop {snap.file(s['path'])} cannot be decoded: delete {snap.dir} to rebuild the crops")
        images.append(img[:, :, ::-1])
        labels.append(index[s["label"]])
        paths.append(s["path"])
    if not images:
        return np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0,), np.int64), []
    return np.stack(images), np.asarray(labels, dtype=np.int64), paths


def build_augment(cfg: AugmentConfig) -> A.Compose:
    ops: list[A.BasicTransform] = []
    if cfg.flips:
        ops += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if cfg.rotate90:
        ops.append(A.RandomRotate90(p=0.5))
    if cfg.shift_px > 0:
        ops.append(A.Affine(translate_px={"x": (-cfg.shift_px, cfg.shift_px), "y": (-cfg.shift_px, cfg.shift_px)},
                            border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.5))
    if cfg.noise > 0:
        ops.append(A.GaussNoise(std_range=(0.0, cfg.noise), p=0.3))
    return A.Compose(ops, seed=0)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float().div_(255.0)


class CropDataset(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: A.Compose | None = None) -> None:
        self.images = images
        self.labels = labels
        self.augment = augment

    def set_epoch(self, seed: int) -> None:
        if self.augment is not None:
            self.augment.set_random_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        if self.augment is not None:
            img = self.augment(image=img)["image"]
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)
        return x, int(self.labels[i])


def class_counts(labels: np.ndarray, classes: Sequence[str]) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(classes))
    return {c: int(n) for c, n in zip(classes, counts, strict=True)}
