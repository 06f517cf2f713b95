"""The DAG (pipelines.dag): the steps in order, each from its own module, with the run-root paths it declares."""

from __future__ import annotations

from defectops.core.layout import RUN
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
