"""``train``: the crop classifier, with a checkpoint every epoch; a rerun resumes from the newest checkpoint. With
``train.nproc`` > 1 it trains with DistributedDataParallel under torchrun (started here, or joined when launched by it).

Reads: ``RUN.crops``, ``RUN.snapshot``. Writes: ``RUN.checkpoints``, ``RUN.model``, ``RUN.mlflow_run``.
"""

from __future__ import annotations

from defectops.core.fsutil import read_json
from defectops.core.layout import RUN
from defectops.core.taxonomy import TaskKind
from defectops.pipelines.context import StepContext, StepError
from defectops.pipelines.results import TrainResult
from defectops.pipelines.tasks import create_task
from defectops.registry.config import RegistryConfig
from defectops.training.config import AnomalyConfig, DataConfig, ModelConfig, TrainConfig
from defectops.training.snapshot import load_snapshot
from defectops.training.trainer import resolve_device

READS = (RUN.crops, RUN.snapshot)
WRITES = (RUN.checkpoints, RUN.model, RUN.mlflow_run)
WORKER_MODULE = "defectops.pipelines.runners.worker"  # what torchrun starts in each process (``<module> train ...``)


def train(ctx: StepContext, data: DataConfig, model: ModelConfig, train: TrainConfig, registry: RegistryConfig,
          seed: int, task: TaskKind, anomaly: AnomalyConfig) -> TrainResult:
    """Train the task's model with checkpoints every epoch; a rerun resumes from the newest checkpoint.

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
        return create_task(task, anomaly=anomaly).fit(ctx, data, model, train, registry, seed)
    finally:
        if owned:
            distributed.cleanup()


def _train_with_torchrun(ctx: StepContext, model: ModelConfig, train: TrainConfig) -> TrainResult:
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
    return TrainResult.from_dict(read_json(marker)["result"])
