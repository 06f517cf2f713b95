"""The DAG (pipelines.dag): the steps in order, each from its own module, with the run-root paths it declares."""

from __future__ import annotations

import dataclasses

from defectops.core.layout import RUN
from defectops.pipelines.context import StepResult
from defectops.pipelines.dag import DAG, STEP_NAMES, get_step
from defectops.pipelines.steps import STEPS


def test_dag_is_the_step_modules_in_order() -> None:
    assert STEP_NAMES == ("pull_data", "validate_data", "train", "evaluate", "register", "export", "verify_export")
    assert [m.__name__.rsplit(".", 1)[1] for m in STEPS] == list(STEP_NAMES)
    for step in DAG:
        assert get_step(step.name) is step and step.summary and step.fn.__module__.endswith(step.name)
        assert "task" in step.config_params or step.name == "pull_data"


def test_every_path_a_step_reads_is_written_before_it() -> None:
    written = {RUN.config}  # the runner pins the resolved configuration before the first step
    for step in DAG:
        assert set(step.reads) <= written, f"{step.name} reads {set(step.reads) - written} that no earlier step writes"
        assert step.writes, f"{step.name} declares no outputs"
        written |= set(step.writes)
    assert len({p for s in DAG for p in s.writes}) == sum(len(s.writes) for s in DAG), "two steps write one path"


def test_every_step_returns_its_typed_result() -> None:
    import typing

    for step in DAG:
        returned = typing.get_type_hints(step.fn)["return"]
        assert isinstance(returned, type) and issubclass(returned, StepResult), f"{step.name} returns {returned}"
        assert dataclasses.is_dataclass(returned)


def test_result_records_without_unset_parts_and_reads_back() -> None:
    from defectops.pipelines.results import ExportResult, TrainResult

    plain = ExportResult("/r/export/model.onnx", 17, 1024)
    assert plain.to_dict() == {"onnx_path": "/r/export/model.onnx", "opset": 17, "bytes": 1024}
    with_int8 = ExportResult("/r/export/model.onnx", 17, 1024, int8={"bytes": 300})
    assert with_int8.to_dict()["int8"] == {"bytes": 300}
    assert ExportResult.from_dict(with_int8.to_dict()) == with_int8
    recorded = {"epochs": 3, "resumed_from_epoch": 1, "nproc": 2, "key_from_a_newer_version": True}
    assert TrainResult.from_dict(recorded) == TrainResult(3, 1, nproc=2)
