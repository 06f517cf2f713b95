"""The registered model format (training.models.model_format): every classifier registry entry and the anomaly model
round-trip to the same outputs, and no load unpickles anything from the artifact store unless the caller opts in: a
booby-trapped pickle where the old MLflow format keeps its weights (or in place of the new weights) never runs."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from defectops.training.models import create_model, list_models
from defectops.training.models.model_format import (
    ANOMALY_WEIGHTS,
    META,
    PICKLE_RISK,
    WEIGHTS,
    ModelFormatError,
    PickledModelError,
    is_registered_model,
    load_registered_model,
    save_registered_anomaly,
    save_registered_classifier,
)

CLASSES = ("false_call", "open", "short")


class Trap:
    """Unpickling this creates ``marker``: what an attacker's ``__reduce__`` would do (with worse code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def _trap_bytes(marker: Path) -> bytes:
    data = pickle.dumps(Trap(marker))
    probe = marker.with_name(marker.name + ".probe")  # the trap is real: unpickling it does create its marker
    pickle.loads(pickle.dumps(Trap(probe)))
    assert probe.exists()
    probe.unlink()
    return data


def _old_mlflow_folder(folder: Path, marker: Path) -> Path:
    """A folder laid out like an MLflow ``pytorch`` flavor (``MLmodel`` + ``data/model.pth``) with a trapped pickle."""
    (folder / "data").mkdir(parents=True)
    (folder / "MLmodel").write_text("flavors:\n  pytorch:\n    model_data: data\n    pytorch_version: 2.14.1\n"
                                    "    serialization_format: pickle\n")
    (folder / "data" / "model.pth").write_bytes(_trap_bytes(marker))
    return folder


def _classifier(name: str, tmp_path: Path, **kw: object) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    net = create_model(name, num_classes=len(CLASSES), img_size=32, **kw).eval()  # type: ignore[arg-type]
    out = tmp_path / name
    save_registered_classifier(net, out, model_name=name, num_classes=len(CLASSES), img_size=32, classes=CLASSES,
                               tta=str(kw.get("tta", "none")), extra={"task": "aoi"})
    return net, out


@pytest.mark.parametrize("name", list_models())
def test_every_classifier_entry_round_trips_to_the_same_logits(name: str, tmp_path: Path) -> None:
    net, out = _classifier(name, tmp_path)
    assert sorted(p.name for p in out.iterdir()) == [META, WEIGHTS]
    meta = json.loads((out / META).read_text())
    assert meta["kind"] == "classifier" and meta["model_name"] == name and meta["classes"] == list(CLASSES)
    assert meta["constructor"] == {"num_classes": 3, "in_chans": 3, "img_size": 32, "tta": "none", "kwargs": {}}
    assert (out / WEIGHTS).read_bytes()[8:9] == b"{"  # safetensors: a length and a JSON header, no pickle opcodes
    loaded = load_registered_model(out)
    assert not loaded.training
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))


def test_tta_and_kwargs_are_rebuilt(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = create_model("aoi_resnet10t", num_classes=2, img_size=32, tta="rot4", drop_rate=0.0).eval()
    save_registered_classifier(net, tmp_path / "m", model_name="aoi_resnet10t", num_classes=2, img_size=32,
                               classes=("a", "b"), kwargs={"drop_path_rate": 0.0})
    loaded = load_registered_model(tmp_path / "m")
    assert loaded.tta == "rot4" and len(loaded.views) == 4  # type: ignore[union-attr]
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))


def test_the_anomaly_model_round_trips(tmp_path: Path) -> None:
    from defectops.training.models.patchcore import create_anomaly_model

    g = torch.Generator().manual_seed(0)
    images = [(0.5 + 0.05 * torch.randn(2, 3, 32, 48, generator=g)).clamp(0, 1) for _ in range(2)]
    net = create_anomaly_model("patchcore_effnet_lite0")
    net.fit(images, coreset_ratio=0.5, max_bank=64, seed=0)
    net.eval()
    save_registered_anomaly(net, tmp_path / "m", model_name="patchcore_effnet_lite0", input_hw=(32, 48),
                            classes=("good", "defect"), extra={"good_class": "good"})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [META, ANOMALY_WEIGHTS]
    meta = json.loads((tmp_path / "m" / META).read_text())
    assert meta["kind"] == "anomaly" and meta["input_hw"] == [32, 48]
    loaded = load_registered_model(tmp_path / "m")
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        (s1, m1), (s2, m2) = net(x), loaded(x)
    assert torch.equal(s1, s2) and torch.equal(m1, m2)


def test_a_pickled_mlflow_model_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = _old_mlflow_folder(tmp_path / "model", marker)
    with pytest.raises(PickledModelError) as e:
        load_registered_model(folder)
    message = str(e.value)
    assert PICKLE_RISK in message and "--allow-pickle" in message and "DEFECTOPS_ALLOW_PICKLE=1" in message
    assert "\n" not in message
    assert not marker.exists()


def test_a_trap_beside_or_instead_of_the_weights_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _, out = _classifier("aoi_resnet10t", tmp_path)
    _old_mlflow_folder(out, marker)  # MLmodel + data/model.pth beside the new format: ignored
    assert is_registered_model(out)
    load_registered_model(out, allow_pickle=True)
    assert not marker.exists()

    (out / WEIGHTS).write_bytes(_trap_bytes(marker))  # the weights replaced by a pickle: the digest no longer holds
    with pytest.raises(ModelFormatError, match="SHA-256"):
        load_registered_model(out)
    meta = json.loads((out / META).read_text())  # an attacker who also rewrites the digest: safetensors refuses it
    meta["weights_sha256"] = __import__("hashlib").sha256((out / WEIGHTS).read_bytes()).hexdigest()
    (out / META).write_text(json.dumps(meta))
    from safetensors import SafetensorError

    with pytest.raises(SafetensorError):  # not a safetensors file: read as bytes, never unpickled
        load_registered_model(out)
    assert not marker.exists()


def test_a_trapped_anomaly_file_is_refused_by_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    out = tmp_path / "m"
    out.mkdir()
    (out / ANOMALY_WEIGHTS).write_bytes(_trap_bytes(marker))
    digest = __import__("hashlib").sha256((out / ANOMALY_WEIGHTS).read_bytes()).hexdigest()
    (out / META).write_text(json.dumps({"format": "defectops-model-v1", "kind": "anomaly", "model_name":
                                        "patchcore_effnet_lite0", "weights": ANOMALY_WEIGHTS,
                                        "weights_sha256": digest}))
    with pytest.raises(ValueError, match="not a DefectOps anomaly model"):
        load_registered_model(out)
    assert not marker.exists()


def test_weights_outside_the_folder_are_refused(tmp_path: Path) -> None:
    _, out = _classifier("aoi_resnet10t", tmp_path)
    meta = json.loads((out / META).read_text())
    shutil.copy(out / WEIGHTS, tmp_path / "elsewhere.safetensors")
    meta["weights"] = "../elsewhere.safetensors"
    (out / META).write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="no weights file"):
        load_registered_model(out)


def test_opting_in_loads_a_real_pickled_version_with_a_one_line_warning(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pytorch

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2).eval()
    mlflow.pytorch.save_model(net, str(tmp_path / "old"), serialization_format="pickle")
    x = torch.rand(3, 4)
    warnings: list[str] = []
    loaded = load_registered_model(tmp_path / "old", allow_pickle=True, warn=warnings.append)
    assert torch.equal(net(x), loaded(x))
    assert len(warnings) == 1 and PICKLE_RISK in warnings[0] and "\n" not in warnings[0]
    monkeypatch.setenv("DEFECTOPS_ALLOW_PICKLE", "1")
    load_registered_model(tmp_path / "old", warn=warnings.append)
    assert len(warnings) == 2
    with pytest.raises(PickledModelError):  # an explicit False wins over the environment
        load_registered_model(tmp_path / "old", allow_pickle=False)
    monkeypatch.delenv("DEFECTOPS_ALLOW_PICKLE")
    with pytest.raises(PickledModelError):
        load_registered_model(tmp_path / "old")


def test_a_registry_version_loads_through_mlflow_and_a_trapped_one_is_refused(tmp_path: Path) -> None:
    """Through an MLflow registry (SQLite + a local artifact store), as the pipeline registers: ``log_artifacts`` of
    the folder and ``create_model_version`` with it as the source."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    net, out = _classifier("aoi_mobilenetv3", tmp_path)
    marker = tmp_path / "pwned"
    old = _old_mlflow_folder(tmp_path / "old", marker)
    c.create_registered_model("m")
    for folder in (out, old):
        rid = c.create_run(exp).info.run_id
        c.log_artifacts(rid, str(folder), "model")
        c.create_model_version("m", f"{c.get_run(rid).info.artifact_uri}/model", run_id=rid)
    loaded = load_registered_model("models:/m/1", tracking_uri=uri)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert np.array_equal(net(x).numpy(), loaded(x).numpy())
    with pytest.raises(PickledModelError, match="models:/m/2 is a pickled"):
        load_registered_model("models:/m/2", tracking_uri=uri)
    c.set_registered_model_alias("m", "champion", "2")
    with pytest.raises(PickledModelError, match="models:/m@champion is a pickled"):
        load_registered_model("models:/m@champion", tracking_uri=uri)
    assert not marker.exists()
