"""The one DAG definition shared by the local runner and (later) the Argo compiler.

A step is a typed function in its own module of :mod:`pipelines.steps`; its parameters other than ``ctx`` name the
config groups it reads, its module declares the run-root paths it reads and writes, and it returns a typed
:class:`pipelines.context.StepResult`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from defectops.pipelines import steps
from defectops.pipelines.config import DefectOpsConfig
from defectops.pipelines.context import StepContext, StepResult


@dataclass(frozen=True)
class Step:
    """One step: its function, the first line of its docstring, and the run-root paths it reads and writes
    (:data:`core.layout.RUN` values; the runner and the Argo compiler can plan with them)."""

    name: str
    fn: Callable[..., StepResult]
    summary: str
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()

    @property
    def config_params(self) -> list[str]:
        return [p for p in inspect.signature(self.fn).parameters if p != "ctx"]

    def __call__(self, ctx: StepContext, cfg: DefectOpsConfig) -> StepResult:
        kwargs = {p: getattr(cfg, p) for p in self.config_params}
        return self.fn(ctx, **kwargs)


def _summary(fn: Callable[..., Any]) -> str:
    return (inspect.getdoc(fn) or "").split("\n")[0]


def _step(module: ModuleType) -> Step:
    name = module.__name__.rsplit(".", 1)[1]
    fn = getattr(module, name)
    return Step(name, fn, _summary(fn), tuple(module.READS), tuple(module.WRITES))


DAG: tuple[Step, ...] = tuple(_step(m) for m in steps.STEPS)
STEP_NAMES: tuple[str, ...] = tuple(s.name for s in DAG)


def get_step(name: str) -> Step:
    for s in DAG:
        if s.name == name:
            return s
    raise KeyError(f"unknown step {name!r}: choose one of {', '.join(STEP_NAMES)}")
