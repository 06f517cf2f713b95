"""Audit appends as compare-and-set on S3 (registry/audit_store.py), against the real SeaweedFS server.

The probe checks the store primitive itself: ``PutObject`` with ``If-None-Match: *`` is refused (412) once the key
exists, also when several writers race for a fresh key. The two-process tests are two "hosts" (separate processes,
separate lock dirs) sharing only the registry and its S3 artifact store, made to race for the same trail head.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from s3server import SeaweedS3

from defectops.registry import audit
from defectops.registry.audit_store import HEAD_TAG, RECORDS_DIR, RUN_TAG, RegistryTrail, record_key
from defectops.registry.config import RegistryConfig
from defectops.registry.governance import record_register
from defectops.registry.mlflow_registry import client as make_client

WORKER = Path(__file__).with_name("audit_cas_proc.py")
CFG = RegistryConfig()


def test_seaweedfs_honours_if_none_match(s3: SeaweedS3) -> None:
    c = s3.client()
    bucket = f"cas-probe-{uuid.uuid4().hex[:8]}"
    c.create_bucket(Bucket=bucket)
    c.put_object(Bucket=bucket, Key="k", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        c.put_object(Bucket=bucket, Key="k", Body=b"second", IfNoneMatch="*")
    assert err.value.response["Error"]["Code"] == "PreconditionFailed"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert c.get_object(Bucket=bucket, Key="k")["Body"].read() == b"first"

    # racing writers on fresh keys: exactly one wins each key
    n, rounds = 4, 5
    clients = [s3.client() for _ in range(n)]
    for r in range(rounds):
        barrier = threading.Barrier(n)

        def put(i: int, r: int = r, barrier: threading.Barrier = barrier) -> str:
            barrier.wait()
            try:
                clients[i].put_object(Bucket=bucket, Key=f"race-{r}", Body=b"%d" % i, IfNoneMatch="*")
            except ClientError as e:
                return str(e.response["Error"]["Code"])
            return "won"

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            outcomes = list(pool.map(put, range(n)))
        wins = [i for i, o in enumerate(outcomes) if o == "won"]
        assert len(wins) == 1 and outcomes.count("PreconditionFailed") == n - 1, (r, outcomes)
        assert c.get_object(Bucket=bucket, Key=f"race-{r}")["Body"].read() == b"%d" % wins[0]


@pytest.fixture
def s3_registry(s3: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fresh SQLite registry whose artifact root is a SeaweedFS bucket: model ``m``, version 1 the gated
    ``challenger`` (registered by ``rita``, its ``register`` record the trail's first, on S3)."""
    bucket = f"audit-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=bucket)
    env = {"MLFLOW_S3_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": s3.access_key,
           "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_DEFAULT_REGION": s3.region}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reg = _registry(f"sqlite:///{tmp_path / 'mlflow.db'}", f"s3://{bucket}/mlruns", tmp_path)
    return {**reg, "bucket": bucket, "env": env, "s3": s3}


def _registry(uri: str, artifact_location: str, tmp_path: Path) -> dict[str, Any]:
    """Model ``m`` in the registry at ``uri`` (artifacts under ``artifact_location``), version 1 the gated
    ``challenger`` registered by ``rita`` (its ``register`` record the trail's first)."""
    c = make_client(uri)
    exp = c.create_experiment("aoi", artifact_location=artifact_location)
    run = c.create_run(exp).info
    evidence = tmp_path / "evidence"
    (evidence / "evidence").mkdir(parents=True)
    (evidence / "metrics.json").write_text("{}")
    (evidence / "evidence" / "gates.json").write_text('{"passed": true}')
    c.log_artifacts(run.run_id, str(evidence))
    c.create_registered_model("m")
    mv = c.create_model_version("m", f"{run.artifact_uri}/model", run_id=run.run_id)
    c.set_model_version_tag("m", str(mv.version), "defectops.gates_passed", "true")
    c.set_registered_model_alias("m", CFG.challenger_alias, str(mv.version))
    record_register(c, "m", str(mv.version), actor="rita", role="ml-engineer", lock_dir=tmp_path / "host0")
    return {"uri": uri, "client": c, "env": {}, "tmp": tmp_path}


@pytest.fixture
def local_registry(tmp_path: Path) -> dict[str, Any]:
    """The same registry with a local artifact store (no compare-and-set): SQLite + a folder."""
    return _registry(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"), tmp_path)


@pytest.fixture
def pg_registry(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The same registry on a real PostgreSQL server (MLflow's SQL backend through psycopg 3), local artifacts."""
    import psycopg
    from pg_server import postgres

    with postgres() as dsn:
        with psycopg.connect(f"{dsn} dbname=postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE mlflow")
        port = dsn.split("port=")[1].split()[0]
        yield _registry(f"postgresql+psycopg://postgres@127.0.0.1:{port}/mlflow", str(tmp_path / "artifacts"),
                        tmp_path)


def test_two_hosts_on_one_postgresql_registry_are_serialised_by_an_advisory_lock(pg_registry: dict[str, Any]
                                                                                  ) -> None:
    """Two processes with separate lock files (two hosts) approving on one PostgreSQL registry with an artifact store
    that has no compare-and-set: the advisory lock in the database serialises them; exactly one approval, the other
    refused, the trail whole."""
    reg = pg_registry
    out = _race(reg, "approve-hosts", both_reach_barrier=False)
    won = [n for n, o in out.items() if "seq" in o]
    lost = [n for n, o in out.items() if "error" in o]
    assert len(won) == 1 and len(lost) == 1, out
    assert out[lost[0]]["type"] == "GovernanceError"
    c = reg["client"]
    assert str(c.get_registered_model("m").aliases[CFG.champion_alias]) == "1"
    result = RegistryTrail(c, "m", reg["tmp"] / "reader").check()
    assert result.ok, result.problem
    assert [(r["action"], r["actor"]) for r in result.records] == [("register", "rita"), ("approve", won[0])]


def test_two_processes_on_one_sqlite_registry_are_serialised_by_its_lock(local_registry: dict[str, Any]) -> None:
    """Two processes with different homes (lock dirs) approving on one SQLite registry whose artifacts are a local
    folder (no compare-and-set): the lock beside the database serialises them, exactly one approval is recorded, the
    other is refused, and the trail is whole."""
    reg = local_registry
    out = _race(reg, "approve-local", both_reach_barrier=False)
    won = [n for n, o in out.items() if "seq" in o]
    lost = [n for n, o in out.items() if "error" in o]
    assert len(won) == 1 and len(lost) == 1, out
    assert out[lost[0]]["type"] == "GovernanceError"
    c = reg["client"]
    assert str(c.get_registered_model("m").aliases[CFG.champion_alias]) == "1"
    result = RegistryTrail(c, "m", reg["tmp"] / "reader").check()
    assert result.ok, result.problem
    assert [(r["action"], r["actor"]) for r in result.records] == [("register", "rita"), ("approve", won[0])]
    db = Path(reg["uri"].removeprefix("sqlite:///"))
    assert (db.parent / f".{db.name}.defectops-locks" / "m.decide.lock").is_file()


def _race(reg: dict[str, Any], mode: str, *, both_reach_barrier: bool = True) -> dict[str, dict[str, Any]]:
    """Start two worker processes (hosts ``a`` and ``b``) together; their JSON outcomes by name."""
    barrier = reg["tmp"] / f"barrier-{mode}"
    barrier.mkdir()
    env = {**os.environ, **reg["env"]}
    procs = {name: subprocess.Popen([sys.executable, str(WORKER), mode, reg["uri"], "m", str(reg["tmp"] / name),
                                     str(barrier), name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for name in ("a", "b")}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr.decode()[-2000:]
        out[name] = json.loads(stdout.decode().strip().splitlines()[-1])
    if both_reach_barrier:
        assert sorted(p.name for p in barrier.iterdir()) == ["a", "b"]  # both reached the put after the same head
    return out


def _prefix(reg: dict[str, Any]) -> str:
    """The trail run's artifact root as a key prefix in the bucket."""
    run = reg["client"].get_registered_model("m").tags[RUN_TAG]
    uri = str(reg["client"].get_run(run).info.artifact_uri)
    return uri.removeprefix(f"s3://{reg['bucket']}/").rstrip("/") + "/"


def _objects(reg: dict[str, Any]) -> list[str]:
    prefix = _prefix(reg)
    listing = reg["s3"].client().list_objects_v2(Bucket=reg["bucket"], Prefix=f"{prefix}{RECORDS_DIR}/")
    return [o["Key"].removeprefix(prefix) for o in listing.get("Contents", [])]


def test_two_processes_append_after_same_head_both_land(s3_registry: dict[str, Any]) -> None:
    reg = s3_registry
    out = _race(reg, "append")
    assert sorted(o.get("seq", -1) for o in out.values()) == [1, 2], out  # the loser retried after the winner
    trail = RegistryTrail(reg["client"], "m", reg["tmp"] / "reader")
    result = trail.check()
    assert result.ok, result.problem
    assert result.per_record
    records = result.records
    assert [r["actor"] for r in records[:1]] == ["rita"]
    assert sorted(r["actor"] for r in records[1:]) == ["a", "b"]
    assert _objects(reg) == [record_key(r["seq"], r["prev_hash"]) for r in records]

    # tampering with the per-record objects is caught
    s3c, keys = reg["s3"].client(), _objects(reg)
    prefix = _prefix(reg)
    last = s3c.get_object(Bucket=reg["bucket"], Key=prefix + keys[-1])["Body"].read()
    s3c.delete_object(Bucket=reg["bucket"], Key=prefix + keys[-1])  # the newest record removed
    cut = trail.check(mirrors=False)
    assert not cut.ok and "not on the trail" in cut.problem
    forged = audit.make_record(audit.AuditRecord.from_dict(records[0]), actor="eve", role="admin", action="approve",
                               model="m", version="1", previous_champion=None, reason="x", evidence="0" * 64)
    s3c.put_object(Bucket=reg["bucket"], Key=prefix + keys[-1], Body=last)
    s3c.put_object(Bucket=reg["bucket"], Key=prefix + record_key(1, forged.prev_hash + "x"),
                   Body=json.dumps(forged.to_dict()).encode())  # a record slipped in beside the chain
    assert "not on the chain" in trail.check(mirrors=False).problem


def test_two_processes_approve_one_wins_other_refused(s3_registry: dict[str, Any]) -> None:
    reg = s3_registry
    out = _race(reg, "approve")
    won = [n for n, o in out.items() if "seq" in o]
    lost = [n for n, o in out.items() if "error" in o]
    assert len(won) == 1 and len(lost) == 1, out
    assert out[won[0]]["seq"] == 1
    assert out[lost[0]]["type"] == "GovernanceError"
    assert "recorded concurrently" in out[lost[0]]["error"] and f"by {won[0]}" in out[lost[0]]["error"]
    c = reg["client"]
    aliases = c.get_registered_model("m").aliases
    assert str(aliases[CFG.champion_alias]) == "1" and CFG.challenger_alias not in aliases
    assert c.get_model_version("m", "1").tags["defectops.reviewer"] == won[0]  # the loser changed nothing
    result = RegistryTrail(c, "m", reg["tmp"] / "reader").check()  # mirrors included
    assert result.ok, result.problem
    assert [(r["action"], r["actor"]) for r in result.records] == [("register", "rita"), ("approve", won[0])]
    assert c.get_registered_model("m").tags[HEAD_TAG] == result.records[-1]["hash"]
