"""One epoch of training and batched inference (the torchvision-references split of a training loop)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from defectops.training import distributed


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss is NaN or infinite; training stops rather than corrupting the weights."""


def train_one_epoch(model: nn.Module, loader: DataLoader[Any], criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device, epoch: int, *,
                    max_grad_norm: float | None = None, autocast_dtype: torch.dtype | None = None,
                    channels_last: bool = False,
                    on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
    """Train for one pass over ``loader``; returns mean loss, accuracy and the last learning rate.

    ``autocast_dtype`` (``torch.bfloat16``) runs the forward pass and the loss under autocast in that dtype (weights,
    gradients and the optimizer stay float32); ``channels_last`` feeds the batch in that memory format.

    Under DDP (a process group is initialised) the loss is checked for finiteness across all ranks at every step, so
    a NaN on any rank stops every rank before the gradient all-reduce, and the returned statistics are over the
    global batch (summed over ranks).
    """
    model.train()
    world = distributed.world_size()
    total_loss, correct, seen = 0.0, 0, 0
    for step, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model(x)
            loss = criterion(logits.float(), y)
        value = loss.item() if world == 1 else distributed.all_reduce_sum([loss.item()])[0] / world
        if not math.isfinite(value):
            raise NonFiniteLossError(f"loss is {value} at epoch {epoch} step {step}: lower train.lr or check "
                                     f"the data for broken samples")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        n = y.shape[0]
        total_loss += loss.item() * n
        correct += int((logits.argmax(1) == y).sum())
        seen += n
        if on_batch:
            on_batch(n)
    if world > 1:
        total_loss, summed_correct, summed_seen = distributed.all_reduce_sum([total_loss, correct, seen])
        correct, seen = int(summed_correct), int(summed_seen)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1),
            "lr": float(optimizer.param_groups[0]["lr"])}


@torch.inference_mode()
def predict_logits(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Logits (N, C) for float images (N, C, H, W) in [0, 1], in eval mode."""
    model.eval()
    out = [model(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))
