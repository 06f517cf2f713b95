"""Training: determinism, checkpoints every epoch, resume after an interruption, non-finite loss, corrupt checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defectops.training.config import ModelConfig, TrainConfig
from defectops.training.engine import NonFiniteLossError
from defectops.training.trainer import CheckpointError, checkpoints, fit

CLASSES = ("false_call", "open", "short")


def _data(n: int = 96, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 40, (n, size, size, 3)).astype(np.uint8)
    for i, c in enumerate(y):  # a learnable signal: a bright square whose position encodes the class
        x[i, 2 + 4 * c: 6 + 4 * c, 4:10, :] = 255
    return x, y


def _cfg(epochs: int = 3) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, threads=1)


MODEL = ModelConfig(name="aoi_mobilenetv3")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_interrupted_training_resumes_to_the_same_weights(tmp_path: Path) -> None:
    x, y = _data()
    full = fit(x, y, CLASSES, MODEL, _cfg(), tmp_path / "full", seed=7)

    class Killed(Exception):
        pass

    def kill_after_first(epoch: int, _stats: dict[str, float]) -> None:
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        fit(x, y, CLASSES, MODEL, _cfg(), tmp_path / "resumed", seed=7, on_epoch=kill_after_first)
    assert [p.name for p in checkpoints(tmp_path / "resumed")] == ["epoch-001.pt"]
    resumed = fit(x, y, CLASSES, MODEL, _cfg(), tmp_path / "resumed", seed=7)
    assert resumed.resumed_from == 1
    assert len(resumed.history) == 3
    a, b = _state(full.model), _state(resumed.model)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in full.history] == pytest.approx([h["loss"] for h in resumed.history])


def test_keeps_recent_checkpoints_only(tmp_path: Path) -> None:
    x, y = _data(48)
    fit(x, y, CLASSES, MODEL, _cfg(epochs=4), tmp_path, seed=0)
    assert [p.name for p in checkpoints(tmp_path)] == ["epoch-003.pt", "epoch-004.pt"]


def test_non_finite_loss_stops_training(tmp_path: Path) -> None:
    x, y = _data(32)
    cfg = _cfg(epochs=1)
    cfg.loss.alpha = [float("inf"), 1.0, 1.0]
    with pytest.raises(NonFiniteLossError, match="train.lr"):
        fit(x, y, CLASSES, MODEL, cfg, tmp_path, seed=0)
    assert checkpoints(tmp_path) == []


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    x, y = _data(32)
    fit(x, y, CLASSES, MODEL, _cfg(epochs=1), tmp_path, seed=0)
    ckpt = checkpoints(tmp_path)[-1]
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"epoch-001.pt is corrupt.*delete it"):
        fit(x, y, CLASSES, MODEL, _cfg(epochs=2), tmp_path, seed=0)


def test_checkpoints_are_tensors_and_plain_values_and_a_pickled_one_never_runs(tmp_path: Path) -> None:
    """Resumable checkpoints (optimizer and scheduler included) load with ``torch.load(weights_only=True)``; a
    checkpoint holding another object (here one whose unpickling would create a file) is refused, its code not run."""
    import pickle

    x, y = _data(32)
    fit(x, y, CLASSES, MODEL, _cfg(epochs=1), tmp_path, seed=0)
    ckpt = checkpoints(tmp_path)[-1]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "history", "classes", "in_chans"} <= set(state)
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] > 0

    marker = tmp_path / "pwned"

    class Trap:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return open, (str(marker), "w")

    torch.save({**state, "history": [Trap()]}, ckpt)
    assert pickle.loads(pickle.dumps(Trap())) and marker.exists()  # the trap is real when unpickled
    marker.unlink()
    with pytest.raises(CheckpointError, match="other than tensors and plain values"):
        fit(x, y, CLASSES, MODEL, _cfg(epochs=2), tmp_path, seed=0)
    assert not marker.exists()


def test_checkpoint_from_other_classes_is_refused(tmp_path: Path) -> None:
    x, y = _data(32)
    fit(x, y, CLASSES, MODEL, _cfg(epochs=1), tmp_path, seed=0)
    with pytest.raises(CheckpointError, match="classes"):
        fit(x, y, ("a", "b", "c"), MODEL, _cfg(epochs=2), tmp_path, seed=0)


def test_checkpoint_keeps_the_test_time_augmentation(tmp_path: Path) -> None:
    from defectops.training.trainer import load_trained_model

    x, y = _data()
    result = fit(x, y, CLASSES, ModelConfig(name="aoi_mobilenetv3", tta="hflip"), _cfg(epochs=1), tmp_path, seed=0)
    net, state = load_trained_model(result.checkpoint)
    assert state["model_tta"] == "hflip"
    assert net.tta == "hflip" and len(net.views) == 2


def test_best_epoch_prefers_macro_recall_then_accuracy_then_the_later_epoch() -> None:
    from defectops.training.trainer import best_epoch

    h = [{"epoch": 1, "val_macro_recall": 0.8, "val_accuracy": 0.9},
         {"epoch": 2, "val_macro_recall": 0.9, "val_accuracy": 0.8},
         {"epoch": 3, "val_macro_recall": 0.9, "val_accuracy": 0.8},
         {"epoch": 4, "val_macro_recall": 0.85, "val_accuracy": 0.99}]
    assert best_epoch(h) == 3
    h[1]["val_accuracy"] = 0.81
    assert best_epoch(h) == 2
    assert best_epoch([{"epoch": 1, "loss": 1.0}]) == 0


def test_selects_the_best_val_epoch_and_resumes_to_the_same_choice(tmp_path: Path) -> None:
    from defectops.training.engine import predict_logits
    from defectops.training.trainer import BEST, best_epoch, load_trained_model

    x, y = _data(96)
    rng = np.random.default_rng(1)
    xv, yv = x[:48].copy(), rng.integers(0, 3, 48)  # noisy val labels: val macro recall moves from epoch to epoch
    cfg = _cfg(epochs=4)
    full = fit(x, y, CLASSES, MODEL, cfg, tmp_path / "full", seed=3, val=(xv, yv))
    assert all("val_macro_recall" in h for h in full.history)
    assert full.selected_epoch == best_epoch(full.history)
    assert full.checkpoint.name == BEST
    net, state = load_trained_model(full.checkpoint)
    assert state["selected_epoch"] == full.selected_epoch and "optimizer" not in state
    chosen = full.history[full.selected_epoch - 1]
    pred = predict_logits(net, torch.from_numpy(xv.transpose(0, 3, 1, 2).copy()).float() / 255, torch.device("cpu"))
    recall = np.mean([(pred.argmax(1)[yv == c] == c).mean() for c in range(3)])
    assert recall == pytest.approx(chosen["val_macro_recall"])
    a, b = _state(full.model), _state(net)
    assert all(torch.equal(a[k], b[k]) for k in a)

    def kill_after_second(epoch: int, _stats: dict) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(x, y, CLASSES, MODEL, cfg, tmp_path / "resumed", seed=3, val=(xv, yv), on_epoch=kill_after_second)
    resumed = fit(x, y, CLASSES, MODEL, cfg, tmp_path / "resumed", seed=3, val=(xv, yv))
    assert resumed.selected_epoch == full.selected_epoch


def test_select_last_keeps_the_last_epoch(tmp_path: Path) -> None:
    x, y = _data(48)
    cfg = _cfg(epochs=2)
    cfg.select = "last"
    r = fit(x, y, CLASSES, MODEL, cfg, tmp_path, seed=0, val=(x[:16], y[:16]))
    assert r.checkpoint.name == "epoch-002.pt" and r.selected_epoch == 2
    cfg.select = "best"
    with pytest.raises(ValueError, match="train.select"):
        fit(x, y, CLASSES, MODEL, cfg, tmp_path / "bad", seed=0)


def test_bf16_channels_last_training_learns_and_saves_a_plain_float32_model(tmp_path: Path) -> None:
    """``train.precision=bf16`` with ``channels_last``: the loss stays finite, the model learns the signal, and what is
    saved (and exported from) is an ordinary float32 state dict."""
    x, y = _data(96, 32)
    cfg = TrainConfig(epochs=5, batch_size=16, lr=1e-3, threads=1, precision="bf16", channels_last=True)
    res = fit(x, y, CLASSES, ModelConfig(name="aoi_resnet10t"), cfg, tmp_path / "bf16", seed=0)
    assert all(np.isfinite(h["loss"]) for h in res.history)
    assert res.history[-1]["loss"] < res.history[0]["loss"] / 2 and res.history[-1]["accuracy"] > 0.7
    saved = torch.load(checkpoints(tmp_path / "bf16")[-1], weights_only=True)["model"]
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float32}


def test_unknown_precision_is_a_clear_error(tmp_path: Path) -> None:
    x, y = _data()
    with pytest.raises(ValueError, match=r"train.precision=fp8 is unknown: use one of fp32, bf16"):
        fit(x, y, CLASSES, MODEL, TrainConfig(epochs=1, precision="fp8"), tmp_path / "x", seed=0)
