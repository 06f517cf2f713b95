"""Argo's published JSON schema made strict (unknown fields fail), for tests that validate generated Argo objects
(``from argo_schema import SCHEMA_ENV, schema_path, validator``): the pipeline's workflows and the drift CronWorkflow.
"""

from __future__ import annotations

import copy
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
from repo_paths import REPO

SCHEMA_ENV = "DEFECTOPS_ARGO_SCHEMA"
SCHEMA_DEFAULT = REPO.parent / "shared" / "schemas" / "argo-workflows-v3.6.19.schema.json"


def schema_path() -> Path:
    return Path(os.environ.get(SCHEMA_ENV) or SCHEMA_DEFAULT)


@cache
def _strict_definitions(path: str) -> dict[str, Any]:
    defs = copy.deepcopy(json.loads(Path(path).read_text())["definitions"])
    for d in defs.values():
        if d.get("type") == "object" and "properties" in d and "additionalProperties" not in d:
            d["additionalProperties"] = False
    return defs


def validator(path: str) -> Any:
    """``validate(obj, definition)``: assert ``obj`` is a valid Argo ``definition`` (e.g. ``Workflow``)."""
    defs = _strict_definitions(path)

    def validate(obj: Any, definition: str) -> None:
        root = {"definitions": defs, "$ref": f"#/definitions/io.argoproj.workflow.v1alpha1.{definition}"}
        errors = sorted(jsonschema.Draft202012Validator(root).iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message[:300]}" for e in errors[:20])

    return validate
