"""core: atomic writes leave the old file or the new one, never half of one; the run-root layout and the tag names
are each defined once, without two names for one path or one tag."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from defectops.core import tags
from defectops.core.fsutil import atomic_dir, read_json, write_json
from defectops.core.layout import RUN, RunLayout


def test_write_json_replaces_atomically_and_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    f = tmp_path / "a" / "m.json"
    write_json(f, {"v": 1})
    assert read_json(f) == {"v": 1}
    with pytest.raises(TypeError):
        write_json(f, {"v": object()})
    assert read_json(f) == {"v": 1} and [p.name for p in f.parent.iterdir()] == ["m.json"]


def test_atomic_dir_publishes_all_or_nothing(tmp_path: Path) -> None:
    out = tmp_path / "crops"

    def killed_while_writing() -> None:
        with atomic_dir(out) as tmp:
            (tmp / "part").write_text("half")
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        killed_while_writing()
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "part").write_text("whole")
    assert (out / "part").read_text() == "whole"


def test_run_layout_has_one_name_per_path() -> None:
    paths = [getattr(RUN, f.name) for f in fields(RunLayout)]
    assert len(paths) == len(set(paths))
    assert all(not p.startswith("/") and ".." not in Path(p).parts for p in paths)
    assert RUN.marker("train") == "steps/train.json"
    assert json.dumps(RUN.metrics) == '"metrics.json"'


def test_tag_names_are_unique_and_prefixed() -> None:
    names = {k: v for k, v in vars(tags).items() if k.isupper() and isinstance(v, str)}
    values = [v for k, v in names.items() if k != "PREFIX"]
    assert len(values) == len(set(values))
    assert all(v.startswith(tags.PREFIX) for v in values)
