"""The pipeline and promotion against a real `mlflow server` (REST registry, proxied artifact store)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from defectops.pipelines.cli import app


def test_run_register_and_approve_on_a_tracking_server(mlflow_server: str, home: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    r = runner.invoke(app, ["run", "+experiment=tiny", f"registry.tracking_uri={mlflow_server}", "run.name=server"])
    assert r.exit_code == 0, r.output
    summary = json.loads(next((home / "runs").glob("server-*/summary.json")).read_text())
    assert summary["tracking_uri"] == mlflow_server
    assert summary["aliases"] == ["challenger"]

    from defectops.registry.mlflow_registry import client

    c = client(mlflow_server)
    mv = c.get_model_version_by_alias("defectops-aoi", "challenger")
    assert str(mv.version) == summary["version"]  # REST returns versions as str, SQLite as int
    assert mv.tags["defectops.export_verified"] == "true"
    assert {a.path for a in c.list_artifacts(mv.run_id)} >= {"metrics.json", "evidence", "model", "onnx"}

    out = home / "preds"
    boards = next((home / "runs").glob("server-*")) / "data" / "boards"
    r = runner.invoke(app, ["predict", "boards", "--model", "models:/defectops-aoi@challenger", "--tracking-uri",
                            mlflow_server, "--input", str(boards), "--list", str(boards / "trainval.txt"),
                            "--out", str(out)])
    assert r.exit_code == 0, r.output

    monkeypatch.setenv("DEFECTOPS_USER", "alice")
    r = runner.invoke(app, ["registry", "approve", summary["version"], "--reason", "trial passed", "--role",
                            "quality-lead", "--tracking-uri", mlflow_server])
    assert r.exit_code == 2 and "--as/--role are refused against the shared registry" in r.output  # self-declared
    r = runner.invoke(app, ["registry", "approve", summary["version"], "--reason", "trial passed", "--tracking-uri",
                        mlflow_server])
    assert r.exit_code == 2 and "needs your MLflow credentials" in r.output  # this server authenticates no one
    # the decision itself through the library (what the review page calls), recorded in the server's store
    from defectops.registry.config import RegistryConfig
    from defectops.registry.governance import approve

    approve(c, "defectops-aoi", summary["version"], actor="alice", role="quality-lead", reason="trial passed",
            cfg=RegistryConfig(), max_regression=0.02, lock_dir=home, identity="review-password")
    assert c.get_model_version_by_alias("defectops-aoi", "champion").version == mv.version
    r = runner.invoke(app, ["registry", "audit", "--verify", "--tracking-uri", mlflow_server])
    assert r.exit_code == 0, r.output
    assert "intact: 2 records" in r.output  # register + approve, read back from the server's artifact store

    from defectops.registry.audit_store import HEAD_TAG, LATEST, RUN_TAG

    tags = c.get_registered_model("defectops-aoi").tags
    run = tags[RUN_TAG]
    assert c.get_experiment(c.get_run(run).info.experiment_id).name == "defectops-audit/defectops-aoi"
    assert {a.path for a in c.list_artifacts(run, "trail")} >= {f"trail/{tags[HEAD_TAG]}.jsonl"}
    latest = Path(c.download_artifacts(run, LATEST, str(home)))
    assert json.loads(latest.read_text().splitlines()[-1])["hash"] == tags[HEAD_TAG]
    assert not (home / "audit" / "defectops-aoi.jsonl").exists()  # no local trail: the server holds it
