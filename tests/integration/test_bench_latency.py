"""Latency bench: the pure timing summaries, and `defectops bench latency` on the tiny run (root and registry)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny import TinyRun
from typer.testing import CliRunner

from defectops.pipelines.cli import app
from defectops.serving.latency import line_budget, measure, summarize


def test_summarize_and_line_budget() -> None:
    r = summarize([0.010, 0.020, 0.030, 0.040, 1.0], batch=8)
    assert r.p50_ms == pytest.approx(30.0) and r.images_per_s == pytest.approx(8 / 0.030)
    assert 40.0 < r.p99_ms <= 1000.0 and r.calls == 5
    b = line_budget(600, crops_per_board=12, images_per_s=400)
    assert b.budget_ms == pytest.approx(100.0) and b.per_board_ms == pytest.approx(30.0)
    assert b.margin_ms == pytest.approx(70.0)
    assert line_budget(6000, 12, 100).margin_ms < 0  # 10 ms per board, 120 ms of work: too slow
    with pytest.raises(ValueError, match="line rate"):
        line_budget(0, 1, 1)
    with pytest.raises(ValueError, match="at least one"):
        summarize([], 1)


def test_measure_cycles_batches_and_counts_calls() -> None:
    seen = []
    r = measure(lambda x: seen.append(x.shape), np.zeros((3, 1, 2, 2), np.float32), 5, warmup=2, min_calls=4,
                min_seconds=0.0)
    assert r.batch == 5 and r.calls == 4 and len(seen) == 6 and set(seen) == {(5, 1, 2, 2)}


def _bench(args: list[str], env: dict[str, str] | None = None) -> dict:
    res = CliRunner().invoke(app, ["bench", "latency", *args, "--json", "--seconds", "0.05", "--batches", "1,4"],
                             env=env)
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_bench_latency_json_on_a_run_root(tiny_run: TinyRun) -> None:
    out = _bench(["--model", str(tiny_run.root), "--line-rate", "600"])
    for key in ("eager", "onnx_fp32", "onnx_int8"):
        r = out[key]
        assert r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] and r["images_per_s"] > 0
        assert r["best"]["batch"] in (1, 4) and set(r["per_batch"]) == {"1", "4"}
    assert out["triton"] is None and "--triton-url" in out["triton_note"]
    assert out["budget_ms"] == pytest.approx(100.0)
    report = json.loads((Path(tiny_run.root) / "export" / "int8.json").read_text())
    assert out["int8_macro_recall_drop"] == pytest.approx(report["macro_recall_drop"])
    assert out["crops_per_board"] > 1  # candidates per synthetic board, from the run's crop statistics


def test_bench_latency_from_the_registry(tiny_run: TinyRun) -> None:
    name = tiny_run.cfg.registry.model_name
    out = _bench(["--model", f"models:/{name}/1", "--line-rate", "300"],
                 env={"DEFECTOPS_HOME": str(tiny_run.home), "MLFLOW_TRACKING_URI": ""})
    assert out["onnx_fp32"]["images_per_s"] > 0 and out["eager"]["images_per_s"] > 0
    assert out["budget_ms"] == pytest.approx(200.0)


def test_bench_latency_usage_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "latency", "--model", str(tmp_path), "--line-rate", "600"])
    assert res.exit_code == 2 and "train/model.pt" in res.output
    res = runner.invoke(app, ["bench", "latency", "--model", str(tmp_path), "--line-rate", "0"])
    assert res.exit_code == 2 and "--line-rate" in res.output
    res = runner.invoke(app, ["bench", "latency", "--model", str(tmp_path), "--line-rate", "5", "--batches", "a"])
    assert res.exit_code == 2 and "--batches" in res.output
