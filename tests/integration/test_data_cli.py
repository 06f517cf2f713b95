"""The `defectops data` commands and `pull_data` from S3, end to end against the session's SeaweedFS server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from defectops.pipelines.cli import EXIT_FAILURE, EXIT_USAGE, app

BUCKET = "defectops-cli"


@pytest.fixture
def s3_env(s3, monkeypatch: pytest.MonkeyPatch) -> str:  # type: ignore[no-untyped-def]
    c = s3.client()
    if BUCKET not in {b["Name"] for b in c.list_buckets()["Buckets"]}:
        c.create_bucket(Bucket=BUCKET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3.region)
    return f"s3://{BUCKET}"


def test_import_synth_push_pull_and_train_from_s3(s3_env: str, home: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    snap = tmp_path / "snap"
    r = runner.invoke(app, ["data", "import", "synth", "--out", str(snap), "--boards", "24", "--size", "256"])
    assert r.exit_code == 0, r.output
    fingerprint = json.loads((snap / "snapshot.json").read_text())["fingerprint"]
    assert fingerprint in r.output
    r = runner.invoke(app, ["data", "validate", str(snap)])
    assert r.exit_code == 0, r.output
    assert "0 of 24 samples quarantined" in r.output
    uri = f"{s3_env}/synth"
    r = runner.invoke(app, ["data", "push", str(snap), uri])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["data", "pull", f"{uri}@{fingerprint}", str(tmp_path / "pulled")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "pulled" / "snapshot.json").read_text())["fingerprint"] == fingerprint

    r = runner.invoke(app, ["run", "+experiment=tiny", "data=snapshot", f"data.root={uri}", "run.name=from-s3"])
    assert r.exit_code == 0, r.output
    root = next((home / "runs").glob("from-s3-*"))
    pulled = json.loads((root / "steps" / "pull_data.json").read_text())["result"]
    assert pulled["files_root"] == str(home / "cache" / "snapshots" / fingerprint)
    summary = json.loads((root / "summary.json").read_text())
    assert summary["aliases"] == ["challenger"]


def test_push_to_unreachable_endpoint_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    snap = tmp_path / "snap"
    assert runner.invoke(app, ["data", "import", "synth", "--out", str(snap), "--boards", "2", "--size", "128"]) \
        .exit_code == 0
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    r = runner.invoke(app, ["data", "push", str(snap), "s3://bucket/p"])
    assert r.exit_code == EXIT_FAILURE
    assert "127.0.0.1:9" in r.output
    assert "Traceback" not in r.output


def test_import_folder_and_errors(tmp_path: Path) -> None:
    import cv2
    import numpy as np

    for cls in ("normal", "solder bridge (short)"):
        (tmp_path / "ds" / cls).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(tmp_path / "ds" / cls / f"crop {i} é.png"), np.full((10 + i, 20, 3), i * 40, np.uint8))
    runner = CliRunner()
    r = runner.invoke(app, ["data", "import", "folder", str(tmp_path / "ds"), "--out", str(tmp_path / "s"),
                            "--good-class", "normal"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s" / "classes.json").read_text()) == ["normal", "solder bridge (short)"]
    assert "3 label conflicts" in r.output  # the same three images in both class folders
    assert len(json.loads((tmp_path / "s" / "duplicates.json").read_text())["conflicts"]) == 3
    r = runner.invoke(app, ["data", "validate", str(tmp_path / "s")])
    assert r.exit_code == EXIT_FAILURE
    assert "6 of 6 samples quarantined (6 label conflicts" in r.output and "--max-conflict-fraction" in r.output
    r = runner.invoke(app, ["data", "import", "folder", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert r.exit_code == EXIT_USAGE
    r = runner.invoke(app, ["data", "import", "deeppcb", str(tmp_path / "ds"), "--out", str(tmp_path / "y")])
    assert r.exit_code == EXIT_USAGE
    assert "trainval.txt" in r.output


def test_validate_keeps_to_the_bad_file_budget_and_reports_links_out(tmp_path: Path) -> None:
    import cv2
    import numpy as np

    for cls in ("normal", "short"):
        (tmp_path / "ds" / cls).mkdir(parents=True)
        for i in range(4):
            cv2.imwrite(str(tmp_path / "ds" / cls / f"{i}.png"), np.full((10, 12 + i, 3), 40 * i + (cls == "short"),
                                                                         np.uint8))
    (tmp_path / "secret").write_text("root:x:0:0\n")
    try:
        (tmp_path / "ds" / "short" / "passwd.png").symlink_to(tmp_path / "secret")
    except OSError:
        pytest.skip("symlinks are not available here")
    runner = CliRunner()
    r = runner.invoke(app, ["data", "import", "folder", str(tmp_path / "ds"), "--out", str(tmp_path / "s")])
    out = " ".join(r.output.split())  # the terminal wraps long lines
    assert r.exit_code == 0, r.output
    assert "1 symlinks lead outside" in out and "short/passwd.png: escapes the dataset root" in out
    r = runner.invoke(app, ["data", "validate", str(tmp_path / "s")])  # 9 samples: the default budget is 0
    out = " ".join(r.output.split())
    assert r.exit_code == EXIT_FAILURE, r.output
    assert "over the bad-file budget of 0 (min of --max-bad-fraction=0.01 of 9 samples" in out
    assert "escapes the dataset root (symlink to" in out
    r = runner.invoke(app, ["data", "validate", str(tmp_path / "s"), "--max-bad-fraction", "0.2",
                            "--max-class-loss", "0.25"])
    assert r.exit_code == 0, r.output
    assert "within the bad-file budget of 1" in " ".join(r.output.split())
