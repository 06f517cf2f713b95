"""Registry governance: approve / reject / rollback rules, the hash-chained audit trail, concurrency and the CLI.

Each test works on its own copy of the registry database left by the session's ``tiny_run`` (version 1 aliased
``challenger``, its registration already the first record of the registry-stored audit trail); artifacts stay where
that run wrote them. More versions are created on the same model source with the tags the register step would set.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from tiny import TinyRun
from typer.testing import CliRunner

from defectops.registry import audit
from defectops.registry.audit_store import HEAD_TAG, RUN_TAG, RegistryTrail
from defectops.registry.config import RegistryConfig
from defectops.registry.governance import GovernanceError, approve, list_versions, reject, rollback
from defectops.registry.mlflow_registry import client as make_client

CFG = RegistryConfig()
QL = {"actor": "quinn", "role": "quality-lead"}


class Reg:
    """A private registry copy: client, model name, lock dir (= the copy's home)."""

    def __init__(self, home: Path, model: str) -> None:
        self.home = home
        self.uri = f"sqlite:///{home / 'mlflow.db'}"
        self.c = make_client(self.uri)
        self.model = model

    def add_version(self, *, run_id: str | None = None, gates: bool = True, challenger: bool = True,
                    tags: dict[str, str] | None = None) -> str:
        v1 = self.c.get_model_version(self.model, "1")
        mv = self.c.create_model_version(self.model, v1.source, run_id=run_id or v1.run_id)
        all_tags = {"defectops.gates_passed": str(gates).lower(),
                    "defectops.review_status": "pending" if gates else "not-eligible",
                    "defectops.macro_recall": v1.tags.get("defectops.macro_recall", "0"), **(tags or {})}
        for k, v in all_tags.items():
            self.c.set_model_version_tag(self.model, str(mv.version), k, v)
        if challenger:
            self.c.set_registered_model_alias(self.model, CFG.challenger_alias, str(mv.version))
        return str(mv.version)

    def alias(self, name: str) -> str | None:
        aliases = self.c.get_registered_model(self.model).aliases
        return str(aliases[name]) if name in aliases else None

    def trail(self) -> RegistryTrail:
        return RegistryTrail(self.c, self.model, self.home)

    def records(self) -> list[dict[str, Any]]:
        """The decisions in the registry-stored trail (after the pipeline's own ``register`` record)."""
        recs = self.trail().records()
        assert recs[0]["action"] == "register"
        return recs[1:]

    def approve(self, version: str, **kw: Any) -> audit.AuditRecord:
        args: dict[str, Any] = {**QL, "reason": "looks good", "cfg": CFG, "max_regression": 0.02,
                                "lock_dir": self.home, **kw}
        return approve(self.c, self.model, version, **args)


@pytest.fixture
def reg(tiny_run: TinyRun, tmp_path: Path) -> Reg:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy2(Path(tiny_run.home) / "mlflow.db", home / "mlflow.db")
    r = Reg(home, tiny_run.cfg.registry.model_name)
    assert r.alias(CFG.challenger_alias) == "1"
    return r


# ------------------------------------------------------------------------------------------------ approve
def test_approve_happy_path(reg: Reg) -> None:
    rec = reg.approve("1")
    assert reg.alias(CFG.champion_alias) == "1"
    assert reg.alias(CFG.challenger_alias) is None
    tags = reg.c.get_model_version(reg.model, "1").tags
    assert tags["defectops.review_status"] == "approved"
    assert tags["defectops.reviewer"] == "quinn"
    assert tags["defectops.review_reason"] == "looks good"
    assert tags["defectops.previous_champion"] == "none"
    assert "defectops.decided_at" in tags
    assert json.loads(tags[f"defectops.audit.{rec.seq}"])["hash"] == rec.hash
    assert reg.c.get_registered_model(reg.model).tags[HEAD_TAG] == rec.hash
    assert not (reg.home / "audit" / f"{reg.model}.jsonl").exists()  # the registry holds the trail
    (only,) = reg.records()
    assert only["action"] == "approve"
    assert only["version"] == "1"
    assert only["previous_champion"] is None
    assert len(only["evidence_digest"]) == 64
    assert only["evidence_digest"] != audit.evidence_digest(None, None)  # the run's evidence was found
    assert reg.trail().check().ok


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"role": "ml-engineer"}, "may not approve"), ({"reason": "  "}, "reason is required")],
)
def test_approve_refuses_role_and_reason(reg: Reg, kw: dict[str, str], match: str) -> None:
    with pytest.raises(GovernanceError, match=match):
        reg.approve("1", **kw)
    assert reg.alias(CFG.champion_alias) is None
    assert reg.records() == []


def test_approve_refuses_failed_gates_and_non_challenger(reg: Reg) -> None:
    failed = reg.add_version(gates=False, challenger=False)
    with pytest.raises(GovernanceError, match="did not pass its release gates"):
        reg.approve(failed)
    passed = reg.add_version(challenger=False)  # gated, but 1 still holds challenger
    with pytest.raises(GovernanceError, match="is not the 'challenger'"):
        reg.approve(passed)
    assert reg.alias(CFG.champion_alias) is None


def test_approve_refuses_same_actor(reg: Reg) -> None:
    reg.c.set_model_version_tag(reg.model, "1", "defectops.registered_by", "quinn")
    with pytest.raises(GovernanceError, match="separation of duties"):
        reg.approve("1")
    reg.approve("1", actor="riley")
    assert reg.alias(CFG.champion_alias) == "1"


def test_approve_refuses_regression_against_champion(reg: Reg, tmp_path: Path) -> None:
    reg.approve("1")
    v1 = reg.c.get_model_version(reg.model, "1")
    metrics = json.loads(Path(reg.c.download_artifacts(v1.run_id, "metrics.json", str(tmp_path))).read_text())
    assert metrics["macro_recall"] > 0.1
    worse = {**metrics, "macro_recall": 0.0, "per_class_recall": dict.fromkeys(metrics["per_class_recall"], 0.0)}
    run = reg.c.create_run(reg.c.get_run(v1.run_id).info.experiment_id, run_name="worse")
    out = tmp_path / "worse" / "metrics.json"
    out.parent.mkdir()
    out.write_text(json.dumps(worse))
    reg.c.log_artifact(run.info.run_id, str(out))
    v2 = reg.add_version(run_id=run.info.run_id)
    with pytest.raises(GovernanceError, match=r"regresses against champion 1.*macro_recall"):
        reg.approve(v2)
    assert reg.alias(CFG.champion_alias) == "1"
    assert reg.alias(CFG.challenger_alias) == v2


# ------------------------------------------------------------------------------------------- reject, rollback
def test_reject(reg: Reg) -> None:
    with pytest.raises(GovernanceError, match="may not reject"):
        reject(reg.c, reg.model, "1", actor="x", role="ml-engineer", reason="r", cfg=CFG, lock_dir=reg.home)
    rec = reject(reg.c, reg.model, "1", reason="false calls on board 7", cfg=CFG, lock_dir=reg.home, **QL)
    assert rec.action == "reject"
    assert reg.alias(CFG.challenger_alias) is None
    tags = reg.c.get_model_version(reg.model, "1").tags
    assert tags["defectops.review_status"] == "rejected"
    assert tags["defectops.reviewer"] == "quinn"
    with pytest.raises(GovernanceError, match="is not the 'challenger'"):
        reg.approve("1")


def test_rollback_restores_previous_champion(reg: Reg) -> None:
    with pytest.raises(GovernanceError, match="no previous champion"):
        rollback(reg.c, reg.model, reason="r", cfg=CFG, lock_dir=reg.home, **QL)
    reg.approve("1")
    v2 = reg.add_version()
    reg.approve(v2)
    assert reg.alias(CFG.champion_alias) == v2
    rec = rollback(reg.c, reg.model, reason="escapes on line 3", cfg=CFG, lock_dir=reg.home, **QL)
    assert (rec.action, rec.version, rec.previous_champion) == ("rollback", "1", v2)
    assert reg.alias(CFG.champion_alias) == "1"
    assert reg.c.get_model_version(reg.model, v2).tags["defectops.review_status"] == "rolled-back"
    with pytest.raises(GovernanceError, match="no previous champion"):
        rollback(reg.c, reg.model, reason="again", cfg=CFG, lock_dir=reg.home, **QL)
    assert [r["action"] for r in reg.records()] == ["approve", "approve", "rollback"]
    assert reg.trail().check().ok


def test_list_versions(reg: Reg) -> None:
    reg.add_version(gates=False, challenger=False)
    rows = list_versions(reg.c, reg.model)
    assert [r["version"] for r in rows] == ["2", "1"]
    assert rows[1]["aliases"] == ["challenger"]
    assert rows[1]["gates_passed"]
    assert not rows[0]["gates_passed"]
    assert rows[0]["review_status"] == "not-eligible"


# --------------------------------------------------------------------------------------------------- audit
def _trail(n: int, tmp_path: Path) -> list[dict[str, Any]]:
    for i in range(n):
        audit.append(tmp_path, actor="a", role="admin", action="approve", model="m", version=str(i + 1),
                     previous_champion=str(i) if i else None, reason=f"r{i}", evidence="0" * 64)
    return audit.read_records(audit.audit_path(tmp_path, "m"))


def test_audit_verify_detects_tampering(tmp_path: Path) -> None:
    recs = _trail(4, tmp_path)
    assert audit.verify(recs) == audit.VerifyResult(True)
    edited = [dict(r) for r in recs]
    edited[1]["reason"] = "something nicer"
    assert audit.verify(edited).first_bad_seq == 1
    assert "modified" in audit.verify(edited).problem
    assert audit.verify(recs[:1] + recs[2:]).first_bad_seq == 1  # deletion
    assert audit.verify([recs[0], recs[2], recs[1], recs[3]]).first_bad_seq == 1  # reordering
    forged = audit.make_record(audit.AuditRecord.from_dict(recs[1]), actor="eve", role="admin", action="approve",
                               model="m", version="9", previous_champion="2", reason="x", evidence="0" * 64)
    assert audit.verify([*recs[:2], forged.to_dict(), *recs[2:]]).first_bad_seq == 3  # insertion
    renumbered = [dict(r) for r in recs[1:]]
    for i, r in enumerate(renumbered):
        r["seq"] = i
    assert audit.verify(renumbered).first_bad_seq == 0  # dropping the head, even renumbered


def test_append_refuses_broken_trail(tmp_path: Path) -> None:
    _trail(2, tmp_path)
    path = audit.audit_path(tmp_path, "m")
    path.write_text(path.read_text().replace('"r0"', '"r0!"'))
    with pytest.raises(audit.AuditError, match="broken at record 0"):
        _trail(1, tmp_path)


# ----------------------------------------------------------------------------------------------- concurrency
@pytest.mark.parametrize("same", [True, False], ids=["same-version", "different-versions"])
def test_concurrent_approvals_leave_one_champion(reg: Reg, same: bool) -> None:
    other = "1" if same else reg.add_version(challenger=False)
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def decide(version: str, actor: str) -> None:
        c = make_client(reg.uri)
        barrier.wait()
        try:
            approve(c, reg.model, version, actor=actor, role="quality-lead", reason="go", cfg=CFG,
                    max_regression=0.02, lock_dir=reg.home)
            outcomes[actor] = "ok"
        except GovernanceError as e:
            outcomes[actor] = str(e)

    threads = [threading.Thread(target=decide, args=(v, a)) for v, a in (("1", "a"), (other, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["a", "b"]
    assert list(outcomes.values()).count("ok") == 1, outcomes
    assert reg.alias(CFG.champion_alias) == "1"
    assert reg.alias(CFG.challenger_alias) is None
    assert [(r["action"], r["version"]) for r in reg.records()] == [("approve", "1")]
    assert reg.trail().check().ok


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_smoke(reg: Reg, monkeypatch: pytest.MonkeyPatch) -> None:
    from defectops.pipelines.cli.registry import registry_app

    monkeypatch.setenv("DEFECTOPS_HOME", str(reg.home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DEFECTOPS_USER", "dana")
    runner = CliRunner()
    model = ["--model", reg.model]

    res = runner.invoke(registry_app, ["list", *model])
    assert res.exit_code == 0, res.output
    assert "challenger" in res.output
    assert runner.invoke(registry_app, ["show", "1", *model]).exit_code == 0
    assert runner.invoke(registry_app, ["approve", "1", "--reason", "ok", *model]).exit_code == 1  # ml-engineer
    assert runner.invoke(registry_app, ["approve", "1", *model]).exit_code == 2  # --reason missing
    res = runner.invoke(registry_app, ["approve", "1", "--reason", "ok", "--role", "quality-lead", *model])
    assert res.exit_code == 0, res.output
    assert reg.alias(CFG.champion_alias) == "1"
    assert reg.records()[0]["actor"] == "dana"
    assert runner.invoke(registry_app, ["rollback", "--reason", "x", "--role", "admin", *model]).exit_code == 1
    res = runner.invoke(registry_app, ["audit", "--verify", *model])
    assert res.exit_code == 0, res.output
    assert "intact: 2 records" in res.output
    snapshot = _snapshot_file(reg)
    snapshot.write_text(snapshot.read_text().replace('"ok"', '"fine"'))
    res = runner.invoke(registry_app, ["audit", "--verify", *model])
    assert res.exit_code == 1
    assert "modified after it was written" in res.output


# ------------------------------------------------------------------------------------------ registry-stored trail
def _snapshot_file(reg: Reg) -> Path:
    """The local file behind the snapshot the head tag names (the SQLite registry's artifacts are a folder)."""
    tags = reg.c.get_registered_model(reg.model).tags
    root = reg.c.get_run(tags[RUN_TAG]).info.artifact_uri.removeprefix("file://")
    return Path(root) / "trail" / f"{tags[HEAD_TAG]}.jsonl"


def test_registry_trail_detects_stale_and_substituted_copies(reg: Reg) -> None:
    reg.approve("1")
    first_head = reg.c.get_registered_model(reg.model).tags[HEAD_TAG]
    v2 = reg.add_version()
    rec = reg.approve(v2)
    assert reg.trail().check().ok
    assert [r["hash"] for r in reg.trail().records()][-1] == rec.hash

    # head moved back to an older (intact) snapshot: the chain verifies, the version tags do not agree
    reg.c.set_registered_model_tag(reg.model, HEAD_TAG, first_head)
    stale = reg.trail().check()
    assert not stale.ok
    assert stale.first_bad_seq == rec.seq
    assert "has only" in stale.problem
    with pytest.raises(GovernanceError, match="broken"):
        rollback(reg.c, reg.model, reason="r", cfg=CFG, lock_dir=reg.home, **QL)
    reg.c.set_registered_model_tag(reg.model, HEAD_TAG, rec.hash)

    # a snapshot replaced by a shorter, internally valid copy: its last hash is not the head
    snapshot = _snapshot_file(reg)
    lines = snapshot.read_text().splitlines(keepends=True)
    original = "".join(lines)
    snapshot.write_text("".join(lines[:-1]))
    swapped = reg.trail().check()
    assert not swapped.ok
    assert "not the head" in swapped.problem
    v3 = reg.add_version()
    with pytest.raises(GovernanceError, match="not the head"):
        reg.approve(v3)
    assert reg.alias(CFG.champion_alias) == v2  # nothing changed
    snapshot.write_text(original)

    # the head tag names a snapshot that is not there
    reg.c.set_registered_model_tag(reg.model, HEAD_TAG, "f" * 64)
    missing = reg.trail().check()
    assert not missing.ok
    assert "missing" in missing.problem
    reg.c.set_registered_model_tag(reg.model, HEAD_TAG, rec.hash)
    assert reg.trail().check().ok
