"""End to end: the whole DAG on the tiny config, the registry state it leaves, resume, gate failure, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import markupsafe
import numpy as np
import pytest
from tiny import TinyRun
from typer.testing import CliRunner

from defectops.pipelines.cli import EXIT_FAILURE, EXIT_GATES, EXIT_USAGE, app
from defectops.pipelines.dag import STEP_NAMES

SUMMARY_KEYS = {"run_id", "run_root", "tracking_uri", "registered_model", "version", "aliases", "gates_passed",
                "metrics", "dataset_fingerprint", "onnx_path", "triton_repository", "report"}


def _client(uri: str):
    from defectops.registry.mlflow_registry import client

    return client(uri)


def test_run_completes_every_step(tiny_run: TinyRun) -> None:
    assert [o.name for o in tiny_run.outcomes] == list(STEP_NAMES)
    assert all(o.status == "done" for o in tiny_run.outcomes)
    for name in STEP_NAMES:
        assert (tiny_run.root / "steps" / f"{name}.json").is_file()


def test_summary_has_the_contract(tiny_run: TinyRun) -> None:
    s = json.loads((tiny_run.root / "summary.json").read_text())
    assert set(s) >= SUMMARY_KEYS
    assert s["aliases"] == ["challenger"]
    assert s["gates_passed"] is True
    for k in ("macro_recall", "per_class_recall", "escape_rate", "false_call_rate", "accuracy"):
        assert s["metrics"][k] is not None
    for k in ("onnx_path", "report", "run_root", "triton_repository"):
        assert Path(s[k]).exists(), k
    assert len(s["dataset_fingerprint"]) == 64


def test_registry_state(tiny_run: TinyRun) -> None:
    s = json.loads((tiny_run.root / "summary.json").read_text())
    c = _client(s["tracking_uri"])
    mv = c.get_model_version_by_alias(s["registered_model"], "challenger")
    assert str(mv.version) == s["version"]
    tags = mv.tags
    assert tags["defectops.dataset_fingerprint"] == s["dataset_fingerprint"]
    assert tags["defectops.config_hash"] == tiny_run.ctx.config_hash
    assert tags["defectops.gates_passed"] == "true"
    assert tags["defectops.export_verified"] == "true"
    assert tags["defectops.run_id"] == s["run_id"]
    assert "defectops.git_commit" in tags
    assert tags["defectops.registered_by"]  # separation of duties: the submitter cannot approve it
    from defectops.registry.audit_store import RegistryTrail

    trail = RegistryTrail(c, s["registered_model"], tiny_run.home).records()  # stored in the registry
    assert trail[0]["action"] == "register"
    assert float(tags["defectops.onnx_top1_agreement"]) >= 0.999
    arts = {a.path for a in c.list_artifacts(mv.run_id)}
    assert {"metrics.json", "evidence", "model", "onnx"} <= arts


def test_registered_model_loads_and_matches_onnx(tiny_run: TinyRun, monkeypatch: pytest.MonkeyPatch) -> None:
    """The version's ``model`` artifact is the tensors-only format (no MLflow pickle) and loads through
    ``load_registered_model`` like the ONNX export scores."""
    import torch

    from defectops.serving.onnx_export import onnx_logits, onnx_session
    from defectops.training.models.model_format import META, WEIGHTS, load_registered_model

    s = json.loads((tiny_run.root / "summary.json").read_text())
    mv = _client(s["tracking_uri"]).get_model_version_by_alias(s["registered_model"], "challenger")
    files = {a.path for a in _client(s["tracking_uri"]).list_artifacts(mv.run_id, "model")}
    assert files == {f"model/{META}", f"model/{WEIGHTS}"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", s["tracking_uri"])  # what a user of this registry would set
    model = load_registered_model(f"models:/{s['registered_model']}@challenger")
    x = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = onnx_logits(onnx_session(Path(s["onnx_path"])), x)
    assert np.abs(ref - got).max() < 1e-3


def test_a_pickled_version_in_the_store_is_refused_by_drift_check(tiny_run: TinyRun, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A version whose ``model`` artifact is an MLflow pickle (here a booby-trapped one: unpickling it would create a
    file) is refused by `drift check` with the reason and the opt-in; its code never runs."""
    import pickle

    s = json.loads((tiny_run.root / "summary.json").read_text())
    c = _client(s["tracking_uri"])
    marker = tmp_path / "pwned"

    class Trap:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return open, (str(marker), "w")

    old = tmp_path / "model"
    (old / "data").mkdir(parents=True)
    (old / "MLmodel").write_text("flavors:\n  pytorch:\n    model_data: data\n    serialization_format: pickle\n")
    (old / "data" / "model.pth").write_bytes(pickle.dumps(Trap()))
    name = "trapped-pickle"
    reg = json.loads((tiny_run.root / "registry.json").read_text())
    exp = c.get_run(reg["mlflow_run_id"]).info.experiment_id
    rid = c.create_run(exp).info.run_id
    c.log_artifacts(rid, str(old), "model")
    c.log_artifacts(rid, str(tiny_run.root / "drift"), "drift")
    c.create_registered_model(name)
    try:
        c.create_model_version(name, f"{c.get_run(rid).info.artifact_uri}/model", run_id=rid)
        monkeypatch.setenv("DEFECTOPS_HOME", str(tiny_run.home))
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.delenv("DEFECTOPS_ALLOW_PICKLE", raising=False)
        r = CliRunner().invoke(app, ["drift", "check", "--model", f"models:/{name}/1", "--images", str(tmp_path)])
        assert r.exit_code == EXIT_USAGE, r.output
        out = " ".join(r.output.split())
        assert "pickled MLflow PyTorch model" in out and "unpickling runs code from the artifact store" in out
        assert "--allow-pickle" in out
        assert not marker.exists()
    finally:
        c.delete_registered_model(name)


def test_triton_repository_layout(tiny_run: TinyRun) -> None:
    s = json.loads((tiny_run.root / "summary.json").read_text())
    model_dir = Path(s["triton_repository"]) / s["registered_model"]
    cfg = (model_dir / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in cfg
    assert "dynamic_batching" in cfg
    assert (model_dir / s["version"] / "model.onnx").is_file()
    labels = (model_dir / "labels.txt").read_text().split()
    assert labels[0] == "false_call" and len(labels) == 7


def test_report_has_plots_and_gates(tiny_run: TinyRun) -> None:
    html = (tiny_run.root / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 3
    assert "escape_rate" in html and "macro_recall" in html
    shortcut = json.loads((tiny_run.root / "data" / "shortcut.json").read_text())
    assert shortcut["metadata"] == "candidate boxes" and shortcut["features"] == ["width", "height", "aspect", "area"]
    assert 'id="shortcut"' in html and str(markupsafe.escape(shortcut["message"])) in html


def test_rerun_skips_completed_steps_and_adds_no_version(tiny_run: TinyRun) -> None:
    from defectops.pipelines.runners.local import run_pipeline

    _, outcomes = run_pipeline(tiny_run.cfg, home=tiny_run.home)
    assert {o.status for o in outcomes} == {"skipped"}
    s = json.loads((tiny_run.root / "summary.json").read_text())
    versions = _client(s["tracking_uri"]).search_model_versions(f"name = '{s['registered_model']}'")
    assert len(versions) == 1


def test_repeated_register_step_is_idempotent(tiny_run: TinyRun) -> None:
    from defectops.pipelines.runners.local import run_single

    out = run_single("register", tiny_run.cfg, tiny_run.root, home=tiny_run.home, force=True)
    assert out.result["version"] == json.loads((tiny_run.root / "summary.json").read_text())["version"]


def test_gate_failure_registers_without_challenger(home: Path) -> None:
    result = CliRunner().invoke(app, ["run", "+experiment=tiny", "gates.min_class_recall=1.0",
                                      "gates.max_false_call_rate=0.0"])
    assert result.exit_code == EXIT_GATES, result.output
    assert "gates failed" in result.output
    summary = json.loads(next((home / "runs").glob("*/summary.json")).read_text())
    assert summary["gates_passed"] is False
    assert summary["version"] == "1"
    assert summary["aliases"] == []
    assert summary["failed_gates"]
    assert summary["onnx_path"] is None


def test_unknown_override_is_a_usage_error(home: Path) -> None:
    result = CliRunner().invoke(app, ["run", "train.epochz=3"])
    assert result.exit_code == EXIT_USAGE
    assert "epochz" in result.output
    assert not (home / "runs").exists()


def test_missing_data_path(home: Path) -> None:
    result = CliRunner().invoke(app, ["run", "data=deeppcb", "data.root=/nonexistent/PCBData"])
    assert result.exit_code == EXIT_FAILURE
    assert "pull_data" in result.output and "/nonexistent/PCBData" in result.output


def test_non_writable_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DEFECTOPS_HOME", str(blocker / "home"))
    result = CliRunner().invoke(app, ["run", "+experiment=tiny"])
    assert result.exit_code == EXIT_USAGE
    assert "not writable" in result.output and "DEFECTOPS_HOME" in result.output


def test_corrupt_model_checkpoint(tiny_run: TinyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_run.root, root)
    (root / "train" / "model.pt").write_bytes(b"garbage")
    monkeypatch.setenv("DEFECTOPS_HOME", str(tiny_run.home))
    result = CliRunner().invoke(app, ["step", "evaluate", "--run-root", str(root), "--force"])
    assert result.exit_code != 0
    assert "corrupt" in result.output and "model.pt" in result.output
    before = json.loads((tiny_run.root / "metrics.json").read_text())
    assert json.loads((root / "metrics.json").read_text()) == before


def test_single_steps_into_a_new_run_root(tiny_run: TinyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFECTOPS_HOME", str(tmp_path / "h"))
    root = tmp_path / "pod-root"
    runner = CliRunner()
    r = runner.invoke(app, ["step", "pull_data", "--run-root", str(root), "+experiment=tiny"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["step", "validate_data", "--run-root", str(root)])
    assert r.exit_code == 0, r.output
    crops = json.loads((root / "data" / "crops" / "snapshot.json").read_text())
    assert crops["num_samples"] > 0
    assert json.loads((root / "data" / "snapshot" / "snapshot.json").read_text())["fingerprint"] == \
        json.loads((tiny_run.root / "data" / "snapshot" / "snapshot.json").read_text())["fingerprint"]
    r = runner.invoke(app, ["step", "nope", "--run-root", str(root)])
    assert r.exit_code == EXIT_USAGE


@pytest.mark.slow
def test_killed_run_resumes(tmp_path: Path) -> None:
    env = {**os.environ, "DEFECTOPS_HOME": str(tmp_path / "h")}
    cmd = [sys.executable, "-m", "defectops.pipelines.cli", "run", "+experiment=tiny", "train.epochs=4",
           "run.name=killed"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    ckpts: list[Path] = []
    while time.monotonic() < deadline and not ckpts:
        ckpts = list((tmp_path / "h").glob("runs/*/train/checkpoints/epoch-00[12].pt"))
        time.sleep(0.2)
    assert ckpts, "training never wrote a checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    root = ckpts[0].parents[2]
    assert not (root / "summary.json").exists()
    assert not (root / "steps" / "train.json").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("already complete, skipped") == 2
    train = json.loads((root / "steps" / "train.json").read_text())["result"]
    assert train["resumed_from_epoch"] >= 1
    assert train["epochs"] == 4
    assert json.loads((root / "summary.json").read_text())["aliases"] == ["challenger"]


def test_champion_is_scored_on_the_same_test_crops(tiny_run: TinyRun, tmp_path: Path) -> None:
    """With a champion in the registry, the no-regression gates compare both models on this run's test crops."""
    import shutil

    from defectops.pipelines.config import load_config
    from defectops.pipelines.runners.local import run_pipeline
    from defectops.registry.mlflow_registry import client

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy2(tiny_run.home / "mlflow.db", home / "mlflow.db")  # artifacts stay where the first run put them
    c = client(f"sqlite:///{home / 'mlflow.db'}")
    c.set_registered_model_alias("defectops-aoi", "champion", "1")
    ctx, _ = run_pipeline(load_config(["+experiment=tiny", "seed=1"]), home=home)
    gates = json.loads((ctx.root / "gates.json").read_text())
    names = [g["name"] for g in gates["results"]]
    assert "no_regression:macro_recall" in names
    champion = json.loads((ctx.root / "eval" / "champion_metrics.json").read_text())
    assert champion["n"] == json.loads((ctx.root / "metrics.json").read_text())["n"]
    evaluate = json.loads((ctx.root / "steps" / "evaluate.json").read_text())["result"]
    assert evaluate["champion_version"] == "version 1"
    onnx_gates = [g["name"] for g in json.loads((ctx.root / "export" / "gates.json").read_text())["results"]]
    assert onnx_gates == names


def test_intervals_in_metrics_board_metrics_report_and_terminal(tiny_run: TinyRun, capsys: pytest.CaptureFixture[str]
                                                                ) -> None:
    from defectops.evaluation.intervals import BoardIntervals, ClassificationIntervals
    from defectops.evaluation.metrics import ClassificationMetrics
    from defectops.pipelines.cli.run import _print_results

    root = tiny_run.root
    metrics = json.loads((root / "metrics.json").read_text())
    ClassificationMetrics.from_dict(metrics)  # the extra key does not break the reader
    iv = ClassificationIntervals.from_dict(metrics["intervals"])
    assert iv.macro_recall is not None and iv.macro_recall.unit == "boards"  # crops of a board resample together
    assert iv.macro_recall.low <= metrics["macro_recall"] <= iv.macro_recall.high
    assert iv.escape_rate.point == pytest.approx(metrics["escape_rate"]) or not iv.escape_rate.defined
    assert set(iv.per_class_recall) == set(metrics["classes"])
    assert "intervals" in json.loads((root / "export" / "metrics.json").read_text())
    board = json.loads((root / "board_metrics.json").read_text())
    for split in ("val", "test"):
        b = board[split]
        bi = BoardIntervals.from_dict(b["intervals"])
        assert bi.map.n == b["boards"] and bi.map.point == pytest.approx(b["map"])
        assert bi.fscore.low <= b["fscore"] <= bi.fscore.high
        assert sum(g["boards"] for g in b["per_group"].values()) == b["boards"]
        assert all(name.startswith("group") for name in b["per_group"])
        assert b["worst_group"]["fscore"] == min(g["fscore"] for g in b["per_group"].values())
    html = (root / "report.html").read_text()
    assert iv.false_call_rate.format_bounds(4) in html and "percentile bootstrap over boards" in html
    assert "Per board design" in html and next(iter(board["test"]["per_group"])) in html
    _print_results(root)
    out = capsys.readouterr().out
    assert iv.false_call_rate.format_bounds() in out and "Wilson" in out
    assert "Board-level detection" in out and BoardIntervals.from_dict(board["test"]["intervals"]).map.format_bounds() \
        in out


def test_per_type_thresholds_travel_from_val_to_the_exported_model(tiny_run: TinyRun) -> None:
    """The thresholds chosen on val (``detect.threshold_per_type`` in the tiny experiment) are the ones the ONNX
    verification applied, the ones in the exported model's metadata, and the ones `predict boards` uses."""
    from defectops.serving.model_ref import from_onnx
    from defectops.serving.predict import detector_for

    root = tiny_run.root
    board = json.loads((root / "board_metrics.json").read_text())
    detector = json.loads((root / "eval" / "detector.json").read_text())
    assert isinstance(board["type_thresholds"], dict)
    classes = json.loads((root / "data" / "crops" / "classes.json").read_text())
    assert set(board["type_thresholds"]) <= set(classes) - {tiny_run.cfg.data.good_class}
    assert detector["type_thresholds"] == board["type_thresholds"]
    assert detector["score_threshold"] == board["score_threshold"]
    onnx_board = json.loads((root / "export" / "board_metrics.json").read_text())
    assert onnx_board["type_thresholds"] == board["type_thresholds"]
    assert onnx_board["score_threshold"] == board["score_threshold"]
    settings = detector_for(from_onnx(root / "export" / "model.onnx")).s
    assert settings.type_thresholds == board["type_thresholds"]
    assert settings.score_threshold == board["score_threshold"]
