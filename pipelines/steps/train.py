"""``train``: the crop classifier, with a checkpoint every epoch; a rerun resumes from the newest checkpoint. With
``train.nproc`` > 1 it trains with DistributedDataParallel under torchrun (started here, or joined when launched by it).

Reads: ``RUN.crops``, ``RUN.snapshot``. Writes: ``RUN.checkpoints``, ``RUN.model``, ``RUN.mlflow_run``.
"""

from __future__ import annotations

from typing import Any

from defectops.core.fsutil import atomic_path, read_json
from defectops.core.layout import RUN
from defectops.pipelines.context import StepContext, StepError
from defectops.pipelines.steps.common import mlflow_run
from defectops.registry.config import RegistryConfig
from defectops.training.config import DataConfig, ModelConfig, TrainConfig
from defectops.training.snapshot import load_snapshot
from defectops.training.trainer import resolve_device

READS = (RUN.crops, RUN.snapshot)
WRITES = (RUN.checkpoints, RUN.model, RUN.mlflow_run)
WORKER_MODULE = "defectops.pipelines.runners.worker"  # what torchrun starts in each process (``<module> train ...``)


def train(ctx: StepContext, data: DataConfig, model: ModelConfig, train: TrainConfig, registry: RegistryConfig,
          seed: int) -> dict[str, Any]:
    """Train the crop classifier with checkpoints every epoch; a rerun resumes from the newest checkpoint.

    ``train.nproc`` > 1 trains with DistributedDataParallel. Outside torchrun this step starts
    ``torchrun --standalone --nproc_per_node=<nproc>``
    of its own worker (``python -m defectops.pipelines.runners.worker train``) and
    returns rank 0's result; under torchrun (``RANK``/``WORLD_SIZE`` set, e.g. ``torchrun ... defectops step train``)
    each process joins the group. Only rank 0 writes checkpoints, ``model.pt``, the MLflow run and the step marker.
    """
    from defectops.training import distributed

    if train.nproc > 1 and not distributed.launched_by_torchrun():
        return _train_with_torchrun(ctx, model, train)
    owned = not distributed.is_initialized()
    distributed.init_from_env(train.device)
    try:
        return _train(ctx, data, model, train, registry, seed)
    finally:
        if owned:
            distributed.cleanup()


def _train(ctx: StepContext, data: DataConfig, model: ModelConfig, train: TrainConfig, registry: RegistryConfig,
           seed: int) -> dict[str, Any]:
    import torch

    from defectops.registry import mlflow_registry as reg
    from defectops.training import distributed
    from defectops.training.data import class_counts, load_split
    from defectops.training.trainer import CheckpointError, fit

    main, world = distributed.rank() == 0, distributed.world_size()
    crops = load_snapshot(ctx.path(RUN.crops))
    x_train, y_train, _ = load_split(crops, "train")
    x_val, y_val, _ = load_split(crops, "val")
    c: Any = None
    rid = ""
    if main:
        c, rid = mlflow_run(ctx, registry)
        reg.log_params(c, rid, {"model": model.name, "epochs": train.epochs, "batch_size": train.batch_size,
                                "lr": train.lr, "sampler": train.sampler, "loss": train.loss.name,
                                "gamma": train.loss.gamma, "seed": seed, "train_samples": len(y_train),
                                "nproc": world,
                                "dataset_fingerprint": load_snapshot(ctx.path(RUN.snapshot)).fingerprint})
    per_epoch = len(y_train) // train.batch_size * train.batch_size if len(y_train) > train.batch_size else len(y_train)
    advance = ctx.reporter.task(f"training {model.name}" + (f" on {world} processes" if world > 1 else ""),
                                train.epochs * per_epoch) if main else (lambda n: None)

    def on_epoch(epoch: int, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            if k != "epoch":
                c.log_metric(rid, f"train_{k}" if not k.startswith("val_") else k, float(v), step=epoch)
        ctx.reporter.log(f"epoch {epoch}/{train.epochs}: " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()
                                                                     if k != "epoch"))

    try:
        result = fit(x_train, y_train, crops.classes, model, train, ctx.path(RUN.checkpoints), seed=seed,
                     val=(x_val, y_val), on_epoch=on_epoch, on_batch=advance if world == 1 else
                     (lambda n: advance(n * world)))
    except CheckpointError as e:
        raise StepError(str(e)) from None
    if not main:
        return {"epochs": len(result.history), "resumed_from_epoch": result.resumed_from, "rank": distributed.rank()}
    if result.resumed_from:
        advance(result.resumed_from * per_epoch)
    with atomic_path(ctx.path(RUN.model)) as tmp:
        state = torch.load(result.checkpoint, map_location="cpu", weights_only=False)
        for k in ("optimizer", "scheduler"):
            state.pop(k, None)
        torch.save(state, tmp)
    out = {"epochs": len(result.history), "resumed_from_epoch": result.resumed_from, "mlflow_run_id": rid,
           "selected_epoch": result.selected_epoch, "select": train.select,
           "selected": result.history[result.selected_epoch - 1] if result.selected_epoch else {},
           "final": result.history[-1] if result.history else {}, "class_counts": class_counts(y_train, crops.classes)}
    weights = state.get("weights_info") or {}
    reg.log_params(c, rid, {"selected_epoch": result.selected_epoch,
                            "pretrained_weights": weights.get("weights", "none"),
                            "pretrained_sha256": weights.get("weights_sha256", "none")})
    if weights:
        out["pretrained"] = weights
    if world > 1:
        out["nproc"] = world
    return out


def _train_with_torchrun(ctx: StepContext, model: ModelConfig, train: TrainConfig) -> dict[str, Any]:
    """Run the train step in ``train.nproc`` processes under ``torchrun --standalone`` and return rank 0's result.

    Rank 0's progress and epoch lines are forwarded to this step's reporter; a failure becomes a :class:`StepError`
    with rank 0's message (:mod:`training.launch` supervises the processes).
    """
    import sys

    import torch

    from defectops.training.launch import supervise, torchrun_command, worker_env

    n = train.nproc
    if resolve_device(train.device).type == "cuda" and n > torch.cuda.device_count():
        raise StepError(f"train.nproc={n} but only {torch.cuda.device_count()} GPU(s) are visible: set train.nproc to "
                        f"at most that, or train.device=cpu")
    if train.batch_size % n:
        raise StepError(f"train.batch_size={train.batch_size} does not split evenly over train.nproc={n} processes: "
                        f"use a multiple of {n} (the global batch stays train.batch_size)")
    marker = ctx.path(RUN.marker("train"))  # rank 0 records its result there (the worker's run_step)
    before = marker.stat().st_mtime_ns if marker.is_file() else None
    cmd = torchrun_command(sys.executable, n, WORKER_MODULE,
                           ["train", "--run-root", str(ctx.root), "--home", str(ctx.home)])
    n_train = sum(1 for x in load_snapshot(ctx.path(RUN.crops)).samples if x["split"] == "train")
    per_epoch = n_train // train.batch_size * train.batch_size if n_train > train.batch_size else n_train
    advance = ctx.reporter.task(f"training {model.name} on {n} processes (torchrun)", train.epochs * per_epoch)
    launch = supervise(cmd, worker_env(n), advance=advance, log=ctx.reporter.log)
    if launch.code != 0 or not marker.is_file() or marker.stat().st_mtime_ns == before:
        raise StepError(f"distributed training ({n} processes) failed: {launch.detail()}")
    return dict(read_json(marker)["result"])
