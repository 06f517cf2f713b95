"""``fit``: the training run around :mod:`training.engine` — model, sampler, schedule, checkpoints and resume.

A checkpoint is written atomically after every epoch (model, optimizer, scheduler, epoch, history). Rerunning with
the same arguments resumes from the newest checkpoint and reproduces an uninterrupted run exactly on CPU: the sampler
and the augmentation are seeded by (seed, epoch), never by state carried across epochs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipelines.fsutil import atomic_path
from training.config import ModelConfig, TrainConfig
from training.data import CropDataset, build_augment, to_tensor
from training.engine import predict_logits, train_one_epoch
from training.losses import create_loss
from training.models import DefectClassifier, create_model
from training.samplers import BalancedSampler

CKPT_RE = re.compile(r"^epoch-(\d{3})\.pt$")
KEEP_CHECKPOINTS = 2


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be loaded."""


@dataclass
class FitResult:
    model: DefectClassifier
    history: list[dict[str, float]]
    resumed_from: int
    checkpoint: Path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(model_cfg: ModelConfig, num_classes: int, img_size: int, in_chans: int = 3) -> DefectClassifier:
    return create_model(model_cfg.name, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                        drop_rate=model_cfg.drop_rate, **dict(model_cfg.kwargs))


def checkpoints(ckpt_dir: Path) -> list[Path]:
    found = sorted((int(m.group(1)), p) for p in ckpt_dir.glob("epoch-*.pt") if (m := CKPT_RE.match(p.name)))
    return [p for _, p in found]


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
            raise ValueError("not a DefectOps checkpoint")
        return state
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupt ({type(e).__name__}: {str(e)[:80]}); delete it to resume "
                              f"from the previous epoch") from None


def _cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    return f


def fit(train_images: np.ndarray, train_labels: np.ndarray, classes: Sequence[str], model_cfg: ModelConfig,
        cfg: TrainConfig, ckpt_dir: Path, *, seed: int, val: tuple[np.ndarray, np.ndarray] | None = None,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        on_batch: Callable[[int], None] | None = None) -> FitResult:
    """Train ``model_cfg`` on crops, checkpointing into ``ckpt_dir``; resumes from the newest checkpoint there."""
    if len(train_labels) == 0:
        raise ValueError("the training split has no samples: add boards or lower data.split.val/test")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(seed)
    num_classes = len(classes)
    img_size = int(train_images.shape[1])
    model = build_model(model_cfg, num_classes, img_size, int(train_images.shape[3])).to(device)
    counts = np.bincount(train_labels, minlength=num_classes)
    criterion = create_loss(cfg.loss.name, gamma=cfg.loss.gamma, alpha=cfg.loss.alpha,
                            label_smoothing=cfg.loss.label_smoothing).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_labels) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _cosine_with_warmup(steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch)))
    dataset = CropDataset(train_images, train_labels, build_augment(cfg.augment))
    sampler = BalancedSampler(train_labels, num_classes, cfg.sampler, beta=cfg.sampler_beta, seed=seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        drop_last=len(train_labels) > cfg.batch_size)
    history: list[dict[str, float]] = []
    start = 0
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    existing = checkpoints(ckpt_dir)
    if existing:
        state = load_checkpoint(existing[-1])
        if list(state.get("classes", [])) != list(classes):
            raise CheckpointError(f"checkpoint {existing[-1]} was trained on classes {state.get('classes')}, not "
                                  f"{list(classes)}: delete {ckpt_dir} to start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = list(state["history"])
        start = int(state["epoch"])
    val_x = to_tensor(val[0]) if val is not None and len(val[1]) else None
    for epoch in range(start, cfg.epochs):
        torch.manual_seed(seed * 1_000_003 + epoch)
        sampler.set_epoch(epoch)
        dataset.set_epoch(seed * 1_000_003 + epoch)
        stats = train_one_epoch(model, loader, criterion, optimizer, scheduler, device, epoch,
                                max_grad_norm=cfg.max_grad_norm, on_batch=on_batch)
        stats["epoch"] = epoch + 1
        if val_x is not None and val is not None:
            pred = predict_logits(model, val_x, device).argmax(1)
            stats["val_accuracy"] = float((pred == val[1]).mean())
        history.append(stats)
        save_checkpoint(ckpt_dir / f"epoch-{epoch + 1:03d}.pt", model, optimizer, scheduler, epoch + 1, history,
                        classes, model_cfg, img_size, counts)
        for old in checkpoints(ckpt_dir)[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
        if on_epoch:
            on_epoch(epoch + 1, stats)
    final = checkpoints(ckpt_dir)[-1]
    return FitResult(model.cpu().eval(), history, start, final)


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, history: list[dict[str, float]],
                    classes: Sequence[str], model_cfg: ModelConfig, img_size: int, counts: np.ndarray) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "epoch": epoch, "history": history, "classes": list(classes), "model_name": model_cfg.name,
             "model_kwargs": dict(model_cfg.kwargs), "img_size": img_size, "class_counts": counts.tolist()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_trained_model(path: Path) -> tuple[DefectClassifier, dict[str, Any]]:
    """Rebuild the model of a checkpoint (or a final ``model.pt``) in eval mode on CPU."""
    state = load_checkpoint(path)
    cfg = ModelConfig(name=state["model_name"], kwargs=state.get("model_kwargs", {}))
    model = build_model(cfg, len(state["classes"]), int(state["img_size"]), int(state.get("in_chans", 3)))
    model.load_state_dict(state["model"])
    return model.eval(), state
