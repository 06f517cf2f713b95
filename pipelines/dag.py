"""The one DAG definition shared by the local runner and (later) the Argo compiler.

A step is a typed function from :mod:`pipelines.steps`; its parameters other than ``ctx`` name the config groups it
reads, which is also what an Argo template will pass it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from defectops.pipelines import steps
from defectops.pipelines.config import DefectOpsConfig
from defectops.pipelines.context import StepContext


@dataclass(frozen=True)
class Step:
    name: str
    fn: Callable[..., dict[str, Any]]
    summary: str

    @property
    def config_params(self) -> list[str]:
        return [p for p in inspect.signature(self.fn).parameters if p != "ctx"]

    def __call__(self, ctx: StepContext, cfg: DefectOpsConfig) -> dict[str, Any]:
        kwargs = {p: getattr(cfg, p) for p in self.config_params}
        return self.fn(ctx, **kwargs)


def _summary(fn: Callable[..., Any]) -> str:
    return (inspect.getdoc(fn) or "").split("\n")[0]


DAG: tuple[Step, ...] = tuple(Step(name, fn, _summary(fn)) for name, fn in steps.STEP_FUNCTIONS.items())
STEP_NAMES: tuple[str, ...] = tuple(s.name for s in DAG)


def get_step(name: str) -> Step:
    for s in DAG:
        if s.name == name:
            return s
    raise KeyError(f"unknown step {name!r}: choose one of {', '.join(STEP_NAMES)}")
