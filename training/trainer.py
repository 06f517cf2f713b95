"""``fit``: the training run around :mod:`training.engine` — model, sampler, schedule, checkpoints and resume.

A checkpoint is written atomically after every epoch (model, optimizer, scheduler, epoch, history): tensors and
plain values only, read back with ``torch.load(weights_only=True)`` (no code runs from a checkpoint file). Rerunning
with the same arguments resumes from the newest checkpoint and reproduces an uninterrupted run exactly on CPU: the
sampler and the augmentation are seeded by (seed, epoch), never by state carried across epochs.

Under torchrun (a process group initialised by :func:`training.distributed.init_from_env`) the same function trains
with DistributedDataParallel: the global batch (``train.batch_size``) and the learning-rate schedule stay those of one
process, each rank taking ``batch_size / world_size`` samples of the same class-balanced draw
(:class:`~training.samplers.DistributedBalancedSampler`) with its own augmentation stream. BatchNorm is synchronised
on CUDA (SyncBatchNorm); on CPU (gloo has none) it normalises per rank, and on both the running statistics are
averaged over ranks after every epoch. Rank 0 alone writes checkpoints (the format of one process, so a run may
resume with another ``nproc``) and calls ``on_epoch``; every rank resumes from the checkpoint rank 0 loaded and
broadcast, and validation is sharded over ranks and summed.

Checkpoint selection (``train.select``): after every epoch the model classifies the val split (one view) and its
macro recall and accuracy enter the history; with ``val_macro_recall`` the epoch with the best val macro recall (ties:
higher accuracy, then the later epoch) is kept as ``best.pt`` (written before that epoch's checkpoint, so a resumed
run finds it consistent) and becomes the run's model. Selection looks at val only; test stays untouched.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader

from defectops.core.fsutil import atomic_path
from defectops.training import distributed
from defectops.training.config import ModelConfig, TrainConfig
from defectops.training.data import CropDataset, build_augment, to_tensor
from defectops.training.engine import predict_logits, train_one_epoch
from defectops.training.losses import create_loss
from defectops.training.models import DefectClassifier, create_model
from defectops.training.models.classifier import single_view
from defectops.training.models.model_format import plain_values
from defectops.training.samplers import BalancedSampler, DistributedBalancedSampler

CKPT_RE = re.compile(r"^epoch-(\d{3})\.pt$")
KEEP_CHECKPOINTS = 2
BEST = "best.pt"
SELECT_MODES = ("val_macro_recall", "last")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # train.precision -> autocast dtype of the forward pass


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be loaded."""


@dataclass
class FitResult:
    model: DefectClassifier
    history: list[dict[str, float]]
    resumed_from: int
    checkpoint: Path
    selected_epoch: int = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(model_cfg: ModelConfig, num_classes: int, img_size: int, in_chans: int = 3, *,
                pretrained: bool = False) -> DefectClassifier:
    """The registry model of ``model_cfg``; ``pretrained`` (a fresh training run) loads its pretrained weights when
    ``model_cfg.pretrained`` allows it. A trained model is rebuilt without them (its own weights follow)."""
    return create_model(model_cfg.name, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                        drop_rate=model_cfg.drop_rate, tta=str(model_cfg.tta),
                        pretrained=pretrained and model_cfg.pretrained,
                        weights=model_cfg.weights if pretrained and model_cfg.pretrained else None,
                        **dict(model_cfg.kwargs))


def best_epoch(history: Sequence[dict[str, float]]) -> int:
    """The epoch (1-based) with the best val macro recall (ties: val accuracy, then the later epoch); 0 if none was
    validated."""
    scored = [(h["val_macro_recall"], h.get("val_accuracy", 0.0), int(h["epoch"])) for h in history
              if "val_macro_recall" in h and math.isfinite(h["val_macro_recall"])]
    return max(scored)[2] if scored else 0


def checkpoints(ckpt_dir: Path) -> list[Path]:
    found = sorted((int(m.group(1)), p) for p in ckpt_dir.glob("epoch-*.pt") if (m := CKPT_RE.match(p.name)))
    return [p for _, p in found]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint (or a final ``model.pt``), read with ``torch.load(weights_only=True)``: tensors and plain values
    only, so no code runs from the file. One saved by a DefectOps that pickled other objects is refused (retrain)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
            raise ValueError("not a DefectOps checkpoint")
        return state
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain values, which loading "
                              f"would run code for ({str(e).splitlines()[0][:120]}); delete it to retrain from the "
                              f"previous epoch") from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupt ({type(e).__name__}: {str(e)[:80]}); delete it to resume "
                              f"from the previous epoch") from None


def _cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    return f


# One function on purpose (the training loop: resume, DDP, selection and checkpoints in one place).
def fit(train_images: np.ndarray, train_labels: np.ndarray, classes: Sequence[str], model_cfg: ModelConfig,  # noqa: C901
        cfg: TrainConfig, ckpt_dir: Path, *, seed: int, val: tuple[np.ndarray, np.ndarray] | None = None,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        on_batch: Callable[[int], None] | None = None) -> FitResult:
    """Train ``model_cfg`` on crops, checkpointing into ``ckpt_dir``; resumes from the newest checkpoint there.

    With an initialised process group this is one rank of a DDP run (see the module docstring): ``on_epoch`` is called
    on rank 0 only, ``on_batch`` with this rank's share of each batch; the history is the same on every rank.
    """
    if len(train_labels) == 0:
        raise ValueError("the training split has no samples: add boards or lower data.split.val/test")
    if cfg.select not in SELECT_MODES:
        raise ValueError(f"train.select={cfg.select} is unknown: use one of {', '.join(SELECT_MODES)}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"train.precision={cfg.precision} is unknown: use one of {', '.join(PRECISIONS)}")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    world, rank = distributed.world_size(), distributed.rank()
    device = resolve_device(cfg.device)
    if world > 1:
        if cfg.batch_size % world:
            raise ValueError(f"train.batch_size={cfg.batch_size} does not split evenly over {world} processes: use "
                             f"a multiple of train.nproc (the global batch stays train.batch_size)")
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(seed)
    num_classes = len(classes)
    img_size = int(train_images.shape[1])
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = _resume_state(ckpt_dir, classes) if world == 1 else _broadcast_resume_state(ckpt_dir, classes)
    model = build_model(model_cfg, num_classes, img_size, int(train_images.shape[3]), pretrained=state is None)
    weights_info = dict(model.weights_info) if state is None else dict(state.get("weights_info", {}))
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and device.type == "cuda":
        model = sync_batchnorm(model)
    counts = np.bincount(train_labels, minlength=num_classes)
    criterion = create_loss(cfg.loss.name, gamma=cfg.loss.gamma, alpha=cfg.loss.alpha,
                            label_smoothing=cfg.loss.label_smoothing).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_labels) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _cosine_with_warmup(steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch)))
    dataset = CropDataset(train_images, train_labels, build_augment(cfg.augment))
    drop_last = len(train_labels) > cfg.batch_size
    sampler: BalancedSampler
    if world == 1:
        sampler = BalancedSampler(train_labels, num_classes, cfg.sampler, beta=cfg.sampler_beta, seed=seed)
    else:
        sampler = DistributedBalancedSampler(train_labels, num_classes, cfg.sampler, beta=cfg.sampler_beta, seed=seed,
                                             num_replicas=world, rank=rank, drop_last=drop_last)
    loader = DataLoader(dataset, batch_size=cfg.batch_size // world, sampler=sampler, num_workers=cfg.num_workers,
                        drop_last=drop_last)
    history: list[dict[str, float]] = []
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = list(state["history"])
        start = int(state["epoch"])
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                        broadcast_buffers=False)
    val_x = to_tensor(val[0]) if val is not None and len(val[1]) else None
    for epoch in range(start, cfg.epochs):
        epoch_seed = seed * 1_000_003 + epoch
        if world > 1:  # each rank its own augmentation (and dropout) stream, still a function of (seed, epoch)
            epoch_seed = (epoch_seed * 1_009 + rank) % (2**63 - 1)
        torch.manual_seed(epoch_seed)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch_seed)
        stats = train_one_epoch(net, loader, criterion, optimizer, scheduler, device, epoch,
                                max_grad_norm=cfg.max_grad_norm, autocast_dtype=PRECISIONS[cfg.precision],
                                channels_last=cfg.channels_last, on_batch=on_batch)
        stats["epoch"] = epoch + 1
        distributed.average_buffers(model)  # DDP: BatchNorm statistics averaged, every rank holds the same model
        if val_x is not None and val is not None:
            with single_view(model):  # selection and monitoring: one view, whatever model.tta says
                stats.update(_val_stats(model, val_x, val[1], num_classes, device, rank, world))
        history.append(stats)
        if rank == 0:
            meta = {"weights_info": weights_info}
            if cfg.select == "val_macro_recall" and best_epoch(history) == epoch + 1:
                save_checkpoint(ckpt_dir / BEST, model, None, None, epoch + 1, history, classes, model_cfg, img_size,
                                counts, extra={**meta, "selected_epoch": epoch + 1, "select": str(cfg.select)})
            save_checkpoint(ckpt_dir / f"epoch-{epoch + 1:03d}.pt", model, optimizer, scheduler, epoch + 1, history,
                            classes, model_cfg, img_size, counts, extra=meta)
            for old in checkpoints(ckpt_dir)[:-KEEP_CHECKPOINTS]:
                old.unlink(missing_ok=True)
            if on_epoch:
                on_epoch(epoch + 1, stats)
    if world == 1:
        final = checkpoints(ckpt_dir)[-1]
    else:
        distributed.barrier()  # rank 0 has written the last checkpoint
        final = ckpt_dir / f"epoch-{max(start, cfg.epochs):03d}.pt"
    selected = len(history)
    if cfg.select == "val_macro_recall" and (chosen := best_epoch(history)) and (ckpt_dir / BEST).is_file():
        final, selected = ckpt_dir / BEST, chosen
        if chosen != len(history):
            model.load_state_dict(load_checkpoint(final)["model"])
    return FitResult(model.cpu().eval(), history, start, final, selected)


def sync_batchnorm(model: DefectClassifier) -> DefectClassifier:
    """BatchNorm layers as SyncBatchNorm (timm's converter: it keeps the activation of timm's ``BatchNormAct2d``,
    which ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` would drop); same parameters and state-dict keys."""
    from timm.layers.norm_act import convert_sync_batchnorm

    return cast(DefectClassifier, convert_sync_batchnorm(model))  # type: ignore[no-untyped-call]


def _resume_state(ckpt_dir: Path, classes: Sequence[str]) -> dict[str, Any] | None:
    """The newest checkpoint in ``ckpt_dir`` (None if there is none), refused if it was trained on other classes."""
    existing = checkpoints(ckpt_dir)
    if not existing:
        return None
    state = load_checkpoint(existing[-1])
    if list(state.get("classes", [])) != list(classes):
        raise CheckpointError(f"checkpoint {existing[-1]} was trained on classes {state.get('classes')}, not "
                              f"{list(classes)}: delete {ckpt_dir} to start over")
    return state


def _broadcast_resume_state(ckpt_dir: Path, classes: Sequence[str]) -> dict[str, Any] | None:
    """Rank 0 loads the newest checkpoint and sends it to every rank (no shared filesystem needed); a checkpoint
    error is raised on every rank, so none is left waiting."""
    payload: tuple[str, Any] = ("none", None)
    if distributed.rank() == 0:
        try:
            payload = ("ok", _resume_state(ckpt_dir, classes))
        except CheckpointError as e:
            payload = ("error", str(e))
    kind, value = distributed.broadcast_object(payload)
    if kind == "error":
        raise CheckpointError(value)
    return cast("dict[str, Any] | None", value)


def _val_stats(model: torch.nn.Module, val_x: torch.Tensor, val_y: np.ndarray, num_classes: int,
               device: torch.device, rank: int, world: int) -> dict[str, float]:
    """Val accuracy and macro recall (over classes present in val); under DDP each rank predicts every
    ``world``-th sample and the per-class counts are summed over ranks."""
    xs, ys = val_x[rank::world], val_y[rank::world]
    pred = predict_logits(model, xs, device).argmax(1) if len(ys) else np.zeros(0, np.int64)
    correct = np.bincount(ys[pred == ys], minlength=num_classes).astype(float)
    support = np.bincount(ys, minlength=num_classes).astype(float)
    if world > 1:
        summed = distributed.all_reduce_sum([*correct.tolist(), *support.tolist()])
        correct, support = np.asarray(summed[:num_classes]), np.asarray(summed[num_classes:])
    total = support.sum()
    present = support > 0
    return {"val_accuracy": float(correct.sum() / total) if total else 0.0,
            "val_macro_recall": float((correct[present] / support[present]).mean()) if present.any() else 0.0}


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, epoch: int,
                    history: list[dict[str, float]], classes: Sequence[str], model_cfg: ModelConfig, img_size: int,
                    counts: np.ndarray, extra: dict[str, Any] | None = None) -> None:
    """Atomically save model (and, for a resumable checkpoint, optimizer and scheduler) with what rebuilds it: tensors
    and plain values only (dicts, lists, str, int, float, bool, None), so :func:`load_checkpoint` reads it with
    ``torch.load(weights_only=True)``. The optimizer's (AdamW) and scheduler's (LambdaLR: its lambda is a function,
    saved as ``None``) state dicts are such values already."""
    state: dict[str, Any] = {
        "model": model.state_dict(), "epoch": int(epoch), "history": plain_values(history),
        "classes": [str(c) for c in classes], "model_name": str(model_cfg.name),
        "model_kwargs": plain_values(dict(model_cfg.kwargs)), "model_tta": str(model_cfg.tta),
        "img_size": int(img_size),
        "in_chans": int(getattr(model, "mean", torch.zeros(1, 3)).shape[1]), "class_counts": counts.tolist(),
        **plain_values(dict(extra or {}))}
    if optimizer is not None and scheduler is not None:
        state["optimizer"] = optimizer.state_dict()
        state["scheduler"] = scheduler.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_trained_model(path: Path) -> tuple[DefectClassifier, dict[str, Any]]:
    """Rebuild the model of a checkpoint (or a final ``model.pt``) in eval mode on CPU."""
    state = load_checkpoint(path)
    cfg = ModelConfig(name=state["model_name"], kwargs=state.get("model_kwargs", {}),
                      tta=state.get("model_tta", "none"))
    model = build_model(cfg, len(state["classes"]), int(state["img_size"]), int(state.get("in_chans", 3)))
    model.load_state_dict(state["model"])
    return model.eval(), state
