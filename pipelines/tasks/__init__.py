"""The kinds of model a run trains, one module each, behind one interface (:class:`Task` in :mod:`.base`): the steps
ask the configured task (``task=verify|classify``) instead of branching on the data.

A new task: a module here with a :class:`Task` subclass, a :class:`core.taxonomy.TaskKind` value, and an entry in
:data:`TASKS`.
"""

from __future__ import annotations

from defectops.core.taxonomy import TaskKind
from defectops.pipelines.results import TrainResult
from defectops.pipelines.tasks.base import Prepared, ShortcutInputs, Task
from defectops.pipelines.tasks.classify import ClassifyTask
from defectops.pipelines.tasks.crops import CropClassifierTask
from defectops.pipelines.tasks.verify import VerifyTask

__all__ = ["TASKS", "ClassifyTask", "CropClassifierTask", "Prepared", "ShortcutInputs", "Task", "TrainResult",
           "VerifyTask", "create_task"]

TASKS: dict[TaskKind, type[Task]] = {TaskKind.verify: VerifyTask, TaskKind.classify: ClassifyTask}


def create_task(kind: TaskKind | str) -> Task:
    """The task implementation of ``kind`` (ValueError naming the choices for an unknown one)."""
    try:
        return TASKS[TaskKind(kind)]()
    except ValueError:
        raise ValueError(f"task={kind} is unknown: use one of {', '.join(TASKS)}") from None
