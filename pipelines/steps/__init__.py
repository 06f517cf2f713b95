"""The DAG's steps, one module each: plain typed functions from a run root (and the sub-configs they name) to a
JSON-able result.

Every input and output is a file under the run root (:data:`core.layout.RUN`), so a step behaves the same in-process
(local runner) and in a pod (``defectops step <name> --run-root ...``). The runner passes each parameter named after a
config group (``data``, ``model``, ``train``, ``gates``, ``registry``, ``export``, ``detect``, ``seed``) from the
resolved configuration. Each module declares the run-root paths it ``READS`` and ``WRITES``; :mod:`pipelines.dag`
collects them.

A new step: a module here with the function and its READS/WRITES, an entry in :data:`STEPS` (in DAG order), a golden
Argo workflow regenerated on purpose (``tests/golden/argo``).
"""

from __future__ import annotations

from types import ModuleType

from defectops.pipelines.steps import evaluate, export, pull_data, register, train, validate_data, verify_export

STEPS: tuple[ModuleType, ...] = (pull_data, validate_data, train, evaluate, register, export, verify_export)
"""The step modules in DAG order; each has a function of its own name, ``READS`` and ``WRITES``."""
