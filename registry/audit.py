"""Append-only, hash-chained audit trail of registry decisions (register, approve, reject, rollback).

What: the record format and the hash chain, plus a JSON-lines file form (``<dir>/audit/<model>.jsonl``, used for
offline copies and tests). Every record carries the
sha256 ``hash`` of its own canonical JSON (sorted keys, no whitespace, without ``hash``) and the ``prev_hash`` of the
record before it, so :func:`verify` detects an edited, deleted, reordered or inserted line. Appends take an
exclusive ``fcntl`` lock on the file and re-verify the chain first, so concurrent writers cannot fork it.

Why: a promotion to ``champion`` puts a model on the production line; who decided, why, on which evidence and what it
replaced must be reconstructible and tamper-evident. The pure parts (:func:`make_record`, :func:`record_hash`,
:func:`verify`, :func:`evidence_digest`) do no I/O. The trail of record lives in the registry's artifact store
(:mod:`registry.audit_store`), which also uses :func:`locked` for same-host serialisation; :mod:`registry.governance`
mirrors each record into a model version tag so the trail is also visible (and cross-checked) in the MLflow UI.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["ACTIONS", "GENESIS", "AuditError", "AuditRecord", "VerifyResult", "append", "audit_path",
           "evidence_digest", "locked", "make_record", "read_records", "record_hash", "verify"]

ACTIONS = ("register", "approve", "reject", "rollback")
GENESIS = "0" * 64


class AuditError(RuntimeError):
    """The audit trail is unreadable or its hash chain is broken."""


@dataclass(frozen=True)
class AuditRecord:
    """One decision; ``hash`` covers every other field, ``prev_hash`` links to the previous record."""

    seq: int
    time: str
    actor: str
    role: str
    action: str
    model: str
    version: str
    previous_champion: str | None
    reason: str
    evidence_digest: str
    prev_hash: str
    hash: str
    identity: str = ""
    """How ``actor`` and ``role`` were established: ``mlflow-basic-auth`` (the registry server authenticated the user
    and the role comes from the user's permission on the model), ``review-sign-in`` / ``proxy``, or
    ``embedded-registry, declared`` (no authentication: the local user's word). Absent from records written before it
    existed (and then not part of their hash), so older trails still verify."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``identity`` only when set, so that records without it hash as they always did)."""
        d = asdict(self)
        if not self.identity:
            del d["identity"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AuditRecord:
        """Inverse of :meth:`to_dict`; raises ``KeyError``/``TypeError`` on a malformed record."""
        prev = d["previous_champion"]
        return cls(seq=int(d["seq"]), time=str(d["time"]), actor=str(d["actor"]), role=str(d["role"]),
                   action=str(d["action"]), model=str(d["model"]), version=str(d["version"]),
                   previous_champion=None if prev is None else str(prev), reason=str(d["reason"]),
                   evidence_digest=str(d["evidence_digest"]), prev_hash=str(d["prev_hash"]), hash=str(d["hash"]),
                   identity=str(d.get("identity") or ""))


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`: ``first_bad_seq`` is the position (0-based line index) of the first bad record."""

    ok: bool
    first_bad_seq: int | None = None
    problem: str = ""


def _canonical(d: Mapping[str, Any]) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(fields: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a record without its ``hash`` field."""
    return hashlib.sha256(_canonical({k: v for k, v in fields.items() if k != "hash"})).hexdigest()


def evidence_digest(gates_json: bytes | None, metrics_json: bytes | None) -> str:
    """sha256 over the version's ``evidence/gates.json`` then ``metrics.json`` bytes (a missing file counts as empty,
    length-prefixed so the two cannot be shifted into each other)."""
    h = hashlib.sha256()
    for part in (gates_json or b"", metrics_json or b""):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def make_record(prev: AuditRecord | None, *, actor: str, role: str, action: str, model: str, version: str,
                previous_champion: str | None, reason: str, evidence: str, now: datetime | None = None,
                identity: str = "") -> AuditRecord:
    """The record that follows ``prev`` (``None`` = first record); pure apart from reading the clock."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}; use one of {list(ACTIONS)}")
    fields: dict[str, Any] = {
        "seq": 0 if prev is None else prev.seq + 1,
        "time": (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="microseconds"),
        "actor": actor, "role": role, "action": action, "model": model, "version": str(version),
        "previous_champion": None if previous_champion is None else str(previous_champion), "reason": reason,
        "evidence_digest": evidence, "prev_hash": GENESIS if prev is None else prev.hash,
    }
    if identity:
        fields["identity"] = identity
    return AuditRecord(**fields, hash=record_hash(fields))


def verify(records: Sequence[Mapping[str, Any] | AuditRecord]) -> VerifyResult:
    """Check the chain: seq 0..n-1 in order, each ``prev_hash`` equals the previous ``hash``, each ``hash`` matches.

    Detects edits (hash mismatch), deletions and insertions (seq gap or ``prev_hash`` mismatch) and reordering.
    Deleting records at the end is detectable only against an external copy of the last hash (the version tags).
    """
    prev_hash = GENESIS
    for i, rec in enumerate(records):
        d = rec.to_dict() if isinstance(rec, AuditRecord) else dict(rec)
        if d.get("seq") != i:
            return VerifyResult(False, i, f"record {i} has seq {d.get('seq')!r}: a record was deleted, inserted or "
                                          "moved")
        if d.get("prev_hash") != prev_hash:
            return VerifyResult(False, i, f"record {i} does not link to the record before it (prev_hash mismatch)")
        if d.get("hash") != record_hash(d):
            return VerifyResult(False, i, f"record {i} was modified after it was written (hash mismatch)")
        prev_hash = str(d["hash"])
    return VerifyResult(True)


def audit_path(audit_dir: Path, model: str) -> Path:
    """``<audit_dir>/audit/<model>.jsonl``."""
    if not model or "/" in model or model.startswith("."):
        raise AuditError(f"model name {model!r} cannot name an audit file; use a name without '/' or a leading '.'")
    return Path(audit_dir) / "audit" / f"{model}.jsonl"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The raw records of a trail (``[]`` when the file does not exist); raises :class:`AuditError` on bad JSON."""
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise AuditError(f"audit trail {path} line {n} is not JSON; restore the file from a backup") from None
    return out


@contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``lock_file`` (created if needed) for the duration of the block."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def last_record(path: Path) -> AuditRecord | None:
    """The verified last record of a trail, ``None`` when empty; raises :class:`AuditError` on a broken chain."""
    records = read_records(path)
    result = verify(records)
    if not result.ok:
        raise AuditError(f"audit trail {path} is broken at record {result.first_bad_seq}: {result.problem}; "
                         "restore it before recording new decisions")
    return AuditRecord.from_dict(records[-1]) if records else None


def append(audit_dir: Path, *, actor: str, role: str, action: str, model: str, version: str,
           previous_champion: str | None, reason: str, evidence: str) -> AuditRecord:
    """Verify the trail, then append and fsync the next record. Callers that also change the registry should hold
    :func:`locked` around both (as :mod:`registry.governance` does); this function locks the file itself too."""
    path = audit_path(audit_dir, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.with_suffix(".jsonl.lock")):
        rec = make_record(last_record(path), actor=actor, role=role, action=action, model=model, version=version,
                          previous_champion=previous_champion, reason=reason, evidence=evidence)
        with open(path, "ab") as f:
            f.write(_canonical(rec.to_dict()) + b"\n")
            f.flush()
            os.fsync(f.fileno())
    return rec
