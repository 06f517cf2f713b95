"""S3 run roots (`defectops step --run-root s3://...`) against a real SeaweedFS server: mirror down, mirror up with
markers last, and two steps run as if in two fresh Argo pods."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from s3server import SeaweedS3
from typer.testing import CliRunner

from defectops.pipelines.cli import app
from defectops.pipelines.runners.remote_root import local_mirror, pull_root, push_root
from defectops.training.remote import RemoteError

BUCKET = "runroots"


@pytest.fixture(scope="module")
def client(s3: SeaweedS3) -> Any:
    c = s3.client()
    if BUCKET not in {b["Name"] for b in c.list_buckets()["Buckets"]}:
        c.create_bucket(Bucket=BUCKET)
    return c


def _uri(tag: str) -> str:
    return f"s3://{BUCKET}/runs/{tag}-{time.time_ns()}"


def test_push_pull_markers_last_and_incremental(client: Any, tmp_path: Path) -> None:
    uri = _uri("sync")
    root = tmp_path / "a"
    for rel, text in {"config.yaml": "x: 1\n", "steps/train.json": "{}\n", "train/model.pt": "w" * 5000,
                      "summary.json": "{}\n", "data/crops/a.png": "png", ".model.pt.tmp": "partial"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    order: list[str] = []
    sent = push_root(root, uri, client=client, progress=order.append)
    assert sent.transferred == 5  # the hidden temp file of an atomic write stays local
    assert order[-2:] == ["steps/train.json", "summary.json"]  # markers after what they vouch for
    assert push_root(root, uri, client=client).transferred == 0  # nothing changed: nothing sent
    (root / "train" / "model.pt").write_text("v" * 5000)
    assert push_root(root, uri, client=client).transferred == 1

    mirror = tmp_path / "b"
    got = pull_root(uri, mirror, client=client)
    assert got.transferred == 5 and (mirror / "train" / "model.pt").read_text() == "v" * 5000
    assert not (mirror / ".model.pt.tmp").exists()
    assert pull_root(uri, mirror, client=client).transferred == 0
    (mirror / "config.yaml").write_text("x: 2\n")  # a stale or damaged local copy is replaced
    assert pull_root(uri, mirror, client=client).transferred == 1
    assert (mirror / "config.yaml").read_text() == "x: 1\n"


def test_run_root_needs_a_prefix(client: Any, tmp_path: Path) -> None:
    with pytest.raises(RemoteError, match="needs a prefix"):
        pull_root(f"s3://{BUCKET}", tmp_path, client=client)


def test_two_steps_in_two_fresh_pods(s3: SeaweedS3, client: Any, tmp_path: Path) -> None:
    """pull_data and validate_data as two Argo pods would run them: each with an empty home, sharing only S3."""
    uri = _uri("pods")
    env = {"AWS_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": s3.access_key,
           "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_DEFAULT_REGION": s3.region}
    runner = CliRunner()
    first = runner.invoke(app, ["step", "pull_data", "--run-root", uri, "+experiment=tiny"],
                          env={**env, "DEFECTOPS_HOME": str(tmp_path / "pod1")})
    assert first.exit_code == 0, first.output
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=uri.split("/", 3)[3])["Contents"]}
    prefix = uri.split("/", 3)[3]
    assert {f"{prefix}/config.yaml", f"{prefix}/steps/pull_data.json"} <= keys
    second = runner.invoke(app, ["step", "validate_data", "--run-root", uri],
                           env={**env, "DEFECTOPS_HOME": str(tmp_path / "pod2")})
    assert second.exit_code == 0, second.output  # found the config and pull_data's outputs in S3
    mirror = local_mirror(uri, tmp_path / "pod2")
    assert (mirror / "steps" / "validate_data.json").is_file()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]}
    assert f"{prefix}/steps/validate_data.json" in keys
    again = runner.invoke(app, ["step", "validate_data", "--run-root", uri],
                          env={**env, "DEFECTOPS_HOME": str(tmp_path / "pod3")})
    assert again.exit_code == 0, again.output
    assert "validate_data skipped" in again.output  # its marker came down from S3: not run twice


def test_s3_run_root_refused_inside_torchrun(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["step", "train", "--run-root", "s3://b/p"],
                             env={"WORLD_SIZE": "2", "DEFECTOPS_HOME": str(tmp_path)})
    assert res.exit_code == 2 and "torchrun" in res.output
