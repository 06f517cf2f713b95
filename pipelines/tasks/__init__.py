"""The kinds of model a run trains, one module each, behind one interface (:class:`Task` in :mod:`.base`): the steps
ask the configured task (``task=verify|classify``) instead of branching on the data.

A new task: a module here with a :class:`Task` subclass, a :class:`core.taxonomy.TaskKind` value, and an entry in
:data:`TASKS`.
"""

from __future__ import annotations

from defectops.core.taxonomy import TaskKind
from defectops.pipelines.results import TrainResult
from defectops.pipelines.tasks.anomaly import AnomalyTask
from defectops.pipelines.tasks.base import Prepared, ShortcutInputs, Task
from defectops.pipelines.tasks.classify import ClassifyTask
from defectops.pipelines.tasks.crops import CropClassifierTask
from defectops.pipelines.tasks.verify import VerifyTask
from defectops.training.config import AnomalyConfig

__all__ = ["TASKS", "AnomalyTask", "ClassifyTask", "CropClassifierTask", "Prepared", "ShortcutInputs", "Task",
           "TrainResult", "VerifyTask", "create_task"]

TASKS: dict[TaskKind, type[Task]] = {TaskKind.verify: VerifyTask, TaskKind.classify: ClassifyTask,
                                     TaskKind.anomaly: AnomalyTask}


def create_task(kind: TaskKind | str, *, anomaly: AnomalyConfig | None = None) -> Task:
    """The task implementation of ``kind`` with the settings it takes (``anomaly`` for ``task=anomaly``; ValueError
    naming the choices for an unknown kind)."""
    try:
        cls = TASKS[TaskKind(kind)]
    except ValueError:
        raise ValueError(f"task={kind} is unknown: use one of {', '.join(TASKS)}") from None
    return cls.from_config(anomaly=anomaly or AnomalyConfig())
