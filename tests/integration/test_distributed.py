"""Distributed training: the sharded class-balanced sampler, and real 2-process DDP runs on CPU (gloo).

* The sampler is tested without processes: shards are disjoint, equally long, their union is the single-process draw
  and the per-rank batches of step ``k`` together are the single-process batch ``k``.
* ``test_two_processes_match_one_process`` trains the same data with the same global batch in 1 process (in pytest)
  and in 2 processes (``torchrun`` of this file's ``__main__``), and compares validation metrics: within
  ``TOLERANCE`` for the default CNN with augmentation (BatchNorm statistics are per rank on CPU and the augmentation
  stream of each rank differs, so the trajectories differ a little), and equal up to float reduction order for a
  model without BatchNorm trained without augmentation (which proves the same samples, batches and LR schedule).
* ``test_killed_distributed_train_step_resumes`` runs the train step the way an Argo pod does
  (``torchrun --standalone --nproc_per_node=2 --no-python defectops step train --run-root ...``), SIGKILLs the process
  group after the first checkpoint (no worker may survive it), resumes with ``train.nproc=2`` alone (the step starts
  torchrun itself), and checks it ends with exactly the weights of the uninterrupted 2-process run above, with one
  step marker and one MLflow run written by rank 0.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from defectops.training.config import AnomalyConfig, AugmentConfig, ModelConfig, TrainConfig
from defectops.training.samplers import BalancedSampler, DistributedBalancedSampler, class_weights

REPO = Path(__file__).resolve().parents[2]  # also run as a torchrun script: no tests/ helpers on its path

CLASSES = ("false_call", "open", "short", "spur")
TOLERANCE = 0.04
"""Largest absolute difference allowed between 1- and 2-process validation accuracy and macro recall for the
pipeline's configuration (default CNN with BatchNorm, default augmentation, 3 epochs, 240 validation crops). On CPU
BatchNorm normalises each rank's half-batch and each rank has its own augmentation stream, so the 2-process run is
another random trajectory of the same training: over seeds 0-5 the per-seed gap was at most 0.021 (accuracy) and
0.031 (macro recall), with equal means (0.974 vs 0.975), about the spread between seeds of one process. Equivalence
itself is checked exactly by the ``exact`` job below."""
EXACT_RTOL = 1e-4
"""Largest relative difference (per tensor, ``|w1 - w2| / |w1|``) allowed between the weights of 1 and 2 processes
without BatchNorm and augmentation: the float32 gradient sums run in another order (observed: 3e-6)."""


# --------------------------------------------------------------------------------------------------- the sampler
LABELS = np.array([0] * 70 + [1] * 20 + [2] * 8 + [3] * 3)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shards_are_disjoint_and_their_union_is_the_single_process_draw(world: int, drop_last: bool) -> None:
    single = BalancedSampler(LABELS, 4, "inverse_frequency", seed=5)
    single.set_epoch(3)
    draw = list(single)
    shards = []
    for r in range(world):
        s = DistributedBalancedSampler(LABELS, 4, "inverse_frequency", seed=5, num_replicas=world, rank=r,
                                       drop_last=drop_last)
        s.set_epoch(3)
        shards.append(list(s))
        assert len(shards[-1]) == len(s)
    assert len({len(s) for s in shards}) == 1, "every rank gets the same number of samples"
    per_rank = len(shards[0])
    # positions in the epoch's draw: rank r holds r, r + W, r + 2W ... (disjoint, together 0 .. W * per_rank - 1)
    merged = [shards[i % world][i // world] for i in range(world * per_rank)]
    n = len(draw)
    if drop_last:
        assert per_rank == n // world
        assert merged == draw[:per_rank * world]
    else:
        assert per_rank == -(-n // world)
        assert merged[:n] == draw
        assert merged[n:] == draw[:world * per_rank - n]  # padding wraps around


@pytest.mark.parametrize("world", [2, 4])
def test_per_rank_batches_together_are_the_single_process_batches(world: int) -> None:
    batch = 16
    labels = np.repeat(np.arange(4), [300, 60, 30, 10])
    single = BalancedSampler(labels, 4, "effective_number", beta=0.99, seed=1)
    single.set_epoch(2)
    draw = list(single)
    ranks = []
    for r in range(world):
        s = DistributedBalancedSampler(labels, 4, "effective_number", beta=0.99, seed=1, num_replicas=world, rank=r,
                                       drop_last=True)
        s.set_epoch(2)
        ranks.append(list(s))
    b = batch // world
    for k in range(len(draw) // batch):
        global_batch = sorted(i for shard in ranks for i in shard[k * b:(k + 1) * b])
        assert global_batch == sorted(draw[k * batch:(k + 1) * batch]), k


def test_each_shard_keeps_the_class_balance() -> None:
    labels = np.array([0] * 5000 + [1] * 300 + [2] * 40 + [3] * 10)
    expected = class_weights(np.bincount(labels), "inverse_frequency")
    for r in range(2):
        s = DistributedBalancedSampler(labels, 4, "inverse_frequency", seed=3, num_samples=40_000, num_replicas=2,
                                       rank=r)
        drawn = np.bincount(labels[list(s)], minlength=4) / len(s)
        assert drawn == pytest.approx(expected, abs=0.015)


def test_set_epoch_redraws_identically_on_every_rank() -> None:
    a = DistributedBalancedSampler(LABELS, 4, "inverse_frequency", seed=1, num_replicas=2, rank=1)
    b = DistributedBalancedSampler(LABELS, 4, "inverse_frequency", seed=1, num_replicas=2, rank=1)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    b.set_epoch(5)
    assert list(a) != list(b)
    with pytest.raises(ValueError, match="rank 2"):
        DistributedBalancedSampler(LABELS, 4, "inverse_frequency", num_replicas=2, rank=2)


def test_helpers_are_single_process_outside_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from defectops.training import distributed

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert not distributed.launched_by_torchrun()
    assert distributed.init_from_env("cpu") == distributed.DistInfo(0, 1, 0)
    assert not distributed.is_initialized()
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.barrier()
    distributed.cleanup()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.launched_by_torchrun() and not distributed.is_main()
    assert distributed.init_from_env("cpu").world_size == 1 and not distributed.is_initialized()


@pytest.mark.parametrize("name", ["aoi_mobilenetv3", "aoi_resnet10t"])
def test_sync_batchnorm_keeps_the_model(name: str) -> None:
    """On CUDA the BatchNorm layers become SyncBatchNorm: same state-dict keys, same eval outputs (activations kept)."""
    from defectops.training.trainer import build_model, sync_batchnorm

    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), 4, 32).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    synced = sync_batchnorm(build_model(ModelConfig(name=name), 4, 32))
    synced.load_state_dict(model.state_dict())
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    with torch.no_grad():
        assert torch.allclose(synced.eval()(x), before, atol=1e-6)


def test_global_batch_must_split_over_the_processes(tmp_path: Path) -> None:
    from defectops.core.taxonomy import TaskKind
    from defectops.pipelines.context import StepContext, StepError
    from defectops.pipelines.steps.train import train
    from defectops.registry.config import RegistryConfig
    from defectops.training.config import DataConfig

    ctx = StepContext(run_id="r", root=tmp_path, home=tmp_path, config_hash="h")
    with pytest.raises(StepError, match="train.batch_size=33 does not split evenly over train.nproc=2"):
        train(ctx, DataConfig(), ModelConfig(), TrainConfig(nproc=2, batch_size=33, device="cpu"), RegistryConfig(),
              0, TaskKind.verify, AnomalyConfig())


# -------------------------------------------------------------------------------------------- 2-process training
TRAIN_COUNTS = (300, 90, 60, 40)
VAL_COUNTS = (120, 40, 40, 40)
PIPELINE = ["+experiment=folder", "data.good_class=false_call", "data.candidates.crop_size=32", "train.nproc=2",
            "train.epochs=3", "train.batch_size=32", "train.threads=1", "train.device=cpu", "model.name=aoi_resnet10t",
            "train.lr=0.003"]
"""The run's configuration: the default CNN (aoi_resnet10t, BatchNorm, from scratch: the folder experiment's
pretrained EfficientNet needs more than 3 epochs at 32 px), loss, sampler and augmentation."""
EXACT_MODEL: dict[str, Any] = {"name": "aoi_vit_tiny", "kwargs": {"depth": 2}}
EXACT_TRAIN: dict[str, Any] = {"epochs": 2, "batch_size": 32, "lr": 1e-3, "threads": 1, "device": "cpu",
                               "augment": {"flips": False, "rotate90": False, "shift_px": 0}}
"""No BatchNorm (a 2-block ViT) and no augmentation: 1 and 2 processes do the same computation."""


def _synthetic(n_per_class: tuple[int, ...], seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced noisy crops; class 0 is noise only, the others a bright shape anywhere that flips and 90-degree
    rotations (the default augmentation) leave in its class: a filled square, a plus, a hollow square."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(n_per_class)), n_per_class)
    x = rng.integers(0, 80, (len(y), size, size, 3)).astype(np.uint8)
    for i, c in enumerate(y):
        if c == 0:
            continue
        top, left = (int(v) for v in rng.integers(2, size - 10, 2))
        v = rng.integers(140, 256)
        if c == 1:
            x[i, top + 1:top + 7, left + 1:left + 7] = v
        elif c == 2:
            x[i, top + 3:top + 5, left:left + 8] = v
            x[i, top:top + 8, left + 3:left + 5] = v
        else:
            x[i, top:top + 8, left:left + 8] = v
            x[i, top + 2:top + 6, left + 2:left + 6] = rng.integers(0, 80)
    return x, y


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run root with crops of a folder-per-class dataset of synthetic 32x32 images, pinned to ``PIPELINE``."""
    import cv2

    from defectops.pipelines.config import load_config
    from defectops.pipelines.runners.local import run_single

    base = tmp_path_factory.mktemp("ddp")
    images = base / "images"
    for split, counts, seed in (("train", TRAIN_COUNTS, 0), ("val", VAL_COUNTS, 1)):
        x, y = _synthetic(counts, seed)
        for i, (img, c) in enumerate(zip(x, y, strict=True)):
            (images / split / CLASSES[c]).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(images / split / CLASSES[c] / f"{i:04d}.png"), img)
    cfg = load_config([*PIPELINE, f"data.root={images}"])
    root = base / "runs" / "base"
    for step in ("pull_data", "validate_data"):
        run_single(step, cfg, root, home=base)
    return root


def _crops(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from defectops.training.data import load_split
    from defectops.training.snapshot import load_snapshot

    crops = load_snapshot(root / "data" / "crops")
    assert tuple(crops.classes) == CLASSES
    x, y, _ = load_split(crops, "train")
    xv, yv, _ = load_split(crops, "val")
    return x, y, xv, yv


def _jobs(root: Path) -> dict[str, tuple[ModelConfig, TrainConfig, int]]:
    """What to train, in 1 and in 2 processes: the pipeline's own configuration, and the exact-comparison one."""
    from defectops.pipelines.config import from_yaml

    cfg = from_yaml((root / "config.yaml").read_text())
    return {"cnn": (cfg.model, cfg.train, cfg.seed), "exact": (ModelConfig(**EXACT_MODEL), _train_cfg(EXACT_TRAIN), 0)}


def _train_cfg(spec: dict[str, Any]) -> TrainConfig:
    spec = dict(spec)
    augment = AugmentConfig(**spec.pop("augment", {}))
    return TrainConfig(**spec, augment=augment)


def _val_metrics(state: dict[str, torch.Tensor], model: ModelConfig, x: np.ndarray, y: np.ndarray
                 ) -> dict[str, float]:
    from defectops.evaluation.metrics import classification_metrics
    from defectops.training.data import to_tensor
    from defectops.training.engine import predict_logits, softmax
    from defectops.training.trainer import build_model

    net = build_model(model, len(CLASSES), x.shape[1])
    net.load_state_dict(state)
    logits = predict_logits(net, to_tensor(x), torch.device("cpu"))
    m = classification_metrics(y, softmax(logits), CLASSES, CLASSES[0])
    return {"accuracy": m.accuracy, "macro_recall": m.macro_recall}


def _worker_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


class _Launched:
    """A 2-process torchrun of this file's ``__main__`` (the jobs of ``_jobs`` + a NaN check), started once per module;
    tests wait for it only when they need its results, so 1-process work can run beside it."""

    def __init__(self, root: Path, out: Path) -> None:
        self.out = out
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               str(root), str(out)]
        self.proc = subprocess.Popen(cmd, env=_worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.output: str | None = None

    def wait(self) -> Path:
        if self.output is None:
            try:
                self.output, _ = self.proc.communicate(timeout=300)
            finally:
                self.stop()
        assert self.proc.returncode == 0, (self.output or "")[-3000:]
        return self.out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def two_processes(run_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Launched]:
    launched = _Launched(run_root, tmp_path_factory.mktemp("ddp-out"))
    yield launched
    launched.stop()


@pytest.mark.slow
def test_two_processes_match_one_process(run_root: Path, two_processes: _Launched, tmp_path: Path) -> None:
    from defectops.training.trainer import fit

    x, y, xv, yv = _crops(run_root)
    single: dict[str, dict[str, Any]] = {}
    for name, (model, train, seed) in _jobs(run_root).items():  # 1 process, here, beside the 2-process runs
        r = fit(x, y, CLASSES, model, train, tmp_path / name, seed=seed, val=(xv, yv))
        single[name] = {"state": r.model.state_dict(), "history": r.history}
    out = two_processes.wait()
    report: dict[str, dict[str, Any]] = {}
    for name, (model, train, _) in _jobs(run_root).items():
        one, two = single[name], torch.load(out / f"{name}.pt", weights_only=False)
        assert len(two["history"]) == len(one["history"]) == train.epochs
        m1, m2 = (_val_metrics(r["state"], model, xv, yv) for r in (one, two))
        report[name] = {"1 process": m1, "2 processes": m2}
        assert two["history"][-1]["val_accuracy"] == pytest.approx(m2["accuracy"])  # sharded validation, summed
        if name == "exact":
            # qkv.bias holds the attention key bias, whose gradient is 0 up to rounding: AdamW turns that noise into
            # lr-sized steps of random sign in both runs, so it is left out (it does not change any output)
            diff = max(float((v.float() - two["state"][k].float()).norm() / v.float().norm().clamp_min(1e-12))
                       for k, v in one["state"].items() if not k.endswith("attn.qkv.bias"))
            report[name]["max_relative_weight_difference"] = diff
            assert diff <= EXACT_RTOL
            assert m1 == pytest.approx(m2, abs=1e-9)
            for h1, h2 in zip(one["history"], two["history"], strict=True):
                assert h1["loss"] == pytest.approx(h2["loss"], rel=1e-4)
                assert h1["lr"] == pytest.approx(h2["lr"], rel=1e-9)
        else:
            assert m1["accuracy"] > 0.9, m1  # the task is learnt, so agreement is not agreement on chance
            assert abs(m1["accuracy"] - m2["accuracy"]) <= TOLERANCE, report
            assert abs(m1["macro_recall"] - m2["macro_recall"]) <= TOLERANCE, report
    print(json.dumps(report, indent=1))
    # a NaN loss on rank 1 only stops both ranks at the same step, before any gradient exchange
    errors = [json.loads((out / f"nonfinite.{r}.json").read_text()) for r in range(2)]
    assert [e["type"] for e in errors] == ["NonFiniteLossError"] * 2, errors
    assert errors[0]["message"] == errors[1]["message"] and "train.lr" in errors[0]["message"]
    assert not list((out / "nonfinite").glob("epoch-*.pt"))


# ------------------------------------------------------------------------------- the train step, killed and resumed
def _processes_mentioning(text: str) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text.encode() in (p / "cmdline").read_bytes():
                    found.append(int(p.name))
            except OSError:
                pass
    return found


@pytest.mark.slow
def test_killed_distributed_train_step_resumes(run_root: Path, two_processes: _Launched, tmp_path: Path) -> None:
    """Killed under torchrun as an Argo pod runs it, resumed by ``train.nproc=2`` alone (the step starts torchrun);
    it ends with the very weights of an uninterrupted 2-process run of the same configuration."""
    from mlflow.tracking import MlflowClient

    from defectops.pipelines.config import from_yaml
    from defectops.pipelines.context import Reporter
    from defectops.pipelines.runners.local import run_single

    root, home = tmp_path / "run", tmp_path / "home"
    shutil.copytree(run_root, root)
    script = Path(sys.executable).parent / "defectops"
    entry = ["--no-python", str(script)] if script.is_file() else ["-m", "defectops.pipelines.cli"]
    argo = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *entry, "step",
            "train", "--run-root", str(root)]
    proc = subprocess.Popen(argo, env={**_worker_env(), "DEFECTOPS_HOME": str(home)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    ckpts = root / "train" / "checkpoints"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (ckpts / "epoch-001.pt").is_file() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert (ckpts / "epoch-001.pt").is_file(), err[-3000:]
    time.sleep(2.5)  # the workers notice that their torchrun is gone (they poll every second) and exit
    assert _processes_mentioning(str(root)) == [], "workers outlived their killed torchrun"
    assert not (root / "steps" / "train.json").exists() and not (root / "train" / "model.pt").exists()
    killed_at = max(int(p.name[6:9]) for p in ckpts.glob("epoch-*.pt"))
    epochs = from_yaml((root / "config.yaml").read_text()).train.epochs
    assert killed_at < epochs

    cfg = from_yaml((root / "config.yaml").read_text())
    outcome = run_single("train", cfg, root, home=home, reporter=Reporter())
    result = json.loads((root / "steps" / "train.json").read_text())["result"]
    assert outcome.result == result and "rank" not in result  # rank 0's result, recorded once
    assert (result["nproc"], result["resumed_from_epoch"], result["epochs"]) == (2, killed_at, epochs)
    resumed = torch.load(root / "train" / "model.pt", weights_only=False)
    reference = torch.load(two_processes.wait() / "cnn.pt", weights_only=False)
    assert resumed["history"] == reference["history"]
    for k, v in reference["state"].items():
        assert torch.equal(v, resumed["model"][k]), k  # gloo sums two ranks in a fixed order: resume is exact
    c = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    assert len(c.search_runs([c.get_run(result["mlflow_run_id"]).info.experiment_id])) == 1  # rank 0's, reopened
    steps = [m.step for m in c.get_metric_history(result["mlflow_run_id"], "train_loss")]
    assert len(steps) == len(set(steps)) and max(steps) == epochs


def _worker(root: str, out_dir: str) -> None:
    """One rank of the 2-process runs (under torchrun): the jobs of ``_jobs``, then a NaN on rank 1 only."""
    from defectops.training import distributed
    from defectops.training.data import CropDataset
    from defectops.training.engine import NonFiniteLossError
    from defectops.training.trainer import fit

    def nan_item(self: CropDataset, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((3, 32, 32), float("nan")), int(self.labels[i])

    x, y, xv, yv = _crops(Path(root))
    out = Path(out_dir)
    info = distributed.init_from_env("cpu")
    try:
        for name, (model, train, seed) in _jobs(Path(root)).items():
            r = fit(x, y, CLASSES, model, train, out / name, seed=seed, val=(xv, yv))
            if info.is_main:
                torch.save({"state": r.model.state_dict(), "history": r.history}, out / f"{name}.pt")
        if info.rank == 1:
            CropDataset.__getitem__ = nan_item  # type: ignore[method-assign]
        try:
            fit(x, y, CLASSES, ModelConfig(), _train_cfg({"epochs": 1, "threads": 1, "device": "cpu"}),
                out / "nonfinite", seed=0)
            result = {"type": None, "message": "trained"}
        except NonFiniteLossError as e:
            result = {"type": type(e).__name__, "message": str(e)}
        (out / f"nonfinite.{info.rank}.json").write_text(json.dumps(result))
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
