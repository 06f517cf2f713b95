"""The task registry (pipelines.tasks) and the choice fields of the configuration: every task kind has one
implementation that refuses data it cannot train on, and a typo in a choice fails when the config is composed."""

from __future__ import annotations

import enum
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from defectops.core.taxonomy import TaskKind
from defectops.pipelines.config import ConfigError, DefectOpsConfig, load_config
from defectops.pipelines.context import StepError
from defectops.pipelines.tasks import TASKS, Task, create_task
from defectops.training.snapshot import Snapshot

BOARD = {"path": "g/1_test.jpg", "template": "g/1_temp.jpg", "label": "boards", "split": "train", "sha256": "0"}
IMAGE = {"path": "normal/1.png", "label": "normal", "split": "train", "sha256": "0"}


def _snapshot(*samples: dict) -> Snapshot:
    return Snapshot(Path("."), Path("."), "f", ("normal",), tuple(samples))


def test_every_task_kind_has_one_implementation() -> None:
    assert set(TASKS) == set(TaskKind)
    for kind in TaskKind:
        task = create_task(kind.value)
        assert isinstance(task, Task) and task.kind is kind
        assert task.model_task in ("aoi", "folder", "anomaly") and task.prepare_label and task.shortcut_metadata
    with pytest.raises(ValueError, match="task=anomly is unknown: use one of verify, classify, anomaly"):
        create_task("anomly")


@pytest.mark.parametrize("kind", [k for k in TaskKind if k is not TaskKind.anomaly])
def test_task_refuses_data_it_cannot_train_on(kind: TaskKind) -> None:
    task = create_task(kind)
    fits, other = (BOARD, IMAGE) if kind is TaskKind.verify else (IMAGE, BOARD)
    task.check_snapshot(_snapshot(fits))
    with pytest.raises(StepError, match=f"task={kind.value} .* pass task="):
        task.check_snapshot(_snapshot(other))


def test_the_anomaly_task_takes_images_and_board_pairs() -> None:
    from defectops.training.config import AnomalyConfig

    task = create_task(TaskKind.anomaly)
    task.check_snapshot(_snapshot(IMAGE))
    task.check_snapshot(_snapshot(BOARD))  # templates are its good images
    with pytest.raises(StepError, match="anomaly.height=16, anomaly.width=256: use 32 to 2048 pixels"):
        create_task(TaskKind.anomaly, anomaly=AnomalyConfig(height=16)).check_snapshot(_snapshot(IMAGE))


def _choice_fields(cls: type, prefix: str = "") -> list[tuple[str, type[enum.Enum]]]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        t = hints[f.name]
        if isinstance(t, type) and issubclass(t, enum.Enum):
            out.append((prefix + f.name, t))
        elif isinstance(t, type) and is_dataclass(t):
            out += _choice_fields(t, f"{prefix}{f.name}.")
    return out


CHOICES = _choice_fields(DefectOpsConfig)


def test_choice_fields_are_enums() -> None:
    names = {n for n, _ in CHOICES}
    assert {"task", "data.source", "data.fit_mode", "data.split.group_by", "model.tta", "train.sampler",
            "train.select", "train.precision", "export.serve", "export.int8.method", "export.triton.instance_kind",
            "detect.select", "detect.confidence"} <= names


@pytest.mark.parametrize(("key", "enum_type"), CHOICES, ids=[n for n, _ in CHOICES])
def test_a_typo_in_a_choice_fails_at_composition_naming_the_choices(key: str, enum_type: type[enum.Enum]) -> None:
    with pytest.raises(ConfigError, match=r"expected one of \[") as e:
        load_config([f"{key}=not_a_choice"])
    assert all(m.name in str(e.value) for m in enum_type)
    value = next(iter(enum_type)).value
    cfg = load_config([f"{key}={value}"])
    node: object = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == value and isinstance(node, str)  # StrEnum: compares and serialises as its value
