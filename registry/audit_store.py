"""The audit trail of a registered model, stored in the registry's own artifact store (the source of truth).

What: :class:`RegistryTrail` keeps the hash-chained records of :mod:`registry.audit` for one registered model in a
dedicated MLflow run (experiment ``defectops-audit/<model>``, found through the registered-model tag
``defectops.audit_run``). Each append uploads a complete, immutable snapshot ``trail/<head hash>.jsonl`` and then
moves the registered-model tag ``defectops.audit_head`` to that hash; ``audit.jsonl`` at the run's root is a
convenience copy of the newest snapshot for people browsing the MLflow UI. Readers follow the head tag, so they
never see a half-uploaded file (an upload is visible only once the tag names it) on any artifact store (local
folder, ``mlflow-artifacts`` proxy, S3), and they check that the snapshot's last hash equals the tag, so a stale or
substituted copy is refused. :meth:`RegistryTrail.check` also compares the trail with the per-version tags
``defectops.audit.<seq>`` that :mod:`registry.governance` mirrors, which catches a trail cut short or rolled back
to an older snapshot together with its head tag.

Why: a trail under one machine's ``$DEFECTOPS_HOME`` is invisible to the review server, CI and other operators of the
same registry, and is lost with that machine. The registry is what every party already shares and backs up.

Concurrency, honestly: appends and the decisions around them are serialised by an ``fcntl`` lock in a local
``lock_dir`` (default ``$DEFECTOPS_HOME``), which covers every process on one host (the CLI and the review server
together). MLflow has no compare-and-set for tags, so two *hosts* appending to the same model's trail at the same
moment can both read head H and both publish a successor: the last tag write wins and the other record drops out of
the chain. The loss is not silent: the loser's snapshot stays in ``trail/`` and its version tag
``defectops.audit.<seq>`` disagrees with the trail, which :meth:`RegistryTrail.check` (``defectops registry audit
--verify``) reports. Run one review server per registry (or decide from one host) to avoid it; a registry with
conditional writes (or a database row lock) would be needed to close the race.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from defectops.core import tags as T
from defectops.registry import audit
from defectops.registry.audit import AuditError, AuditRecord

__all__ = ["EXPERIMENT_PREFIX", "HEAD_TAG", "LATEST", "MIRROR_PREFIX", "RUN_TAG", "TRAIL_DIR", "RegistryTrail",
           "TrailCheck"]

EXPERIMENT_PREFIX = "defectops-audit/"
HEAD_TAG = "defectops.audit_head"
RUN_TAG = "defectops.audit_run"
MIRROR_PREFIX = T.AUDIT_PREFIX
TRAIL_DIR = "trail"
LATEST = "audit.jsonl"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrailCheck:
    """Outcome of :meth:`RegistryTrail.check`: ``records`` are what the head tag names (possibly empty)."""

    ok: bool
    records: list[dict[str, Any]] = field(default_factory=list)
    problem: str = ""
    first_bad_seq: int | None = None
    location: str = ""


def _canonical_lines(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
                    for r in records)


class RegistryTrail:
    """The audit trail of ``model`` in the registry behind ``client``; ``lock_dir`` holds the same-host locks."""

    def __init__(self, client: MlflowClient, model: str, lock_dir: Path) -> None:
        audit.audit_path(Path(lock_dir), model)  # validates the model name for use in file names
        self.client = client
        self.model = model
        self.lock_dir = Path(lock_dir)

    # ------------------------------------------------------------------------------------------------ locking
    def _lock_file(self, kind: str) -> Path:
        return self.lock_dir / "audit" / f"{self.model}.{kind}.lock"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The decision lock: hold it around the registry checks and writes that go with an append."""
        with audit.locked(self._lock_file("decide")):
            yield

    # ------------------------------------------------------------------------------------------------ pointers
    def _model_tags(self) -> dict[str, str]:
        try:
            return dict(self.client.get_registered_model(self.model).tags)
        except MlflowException:
            raise AuditError(f"no registered model {self.model!r} in the registry at {self.client.tracking_uri}; "
                             "its audit trail lives with it") from None

    def location(self, tags: dict[str, str] | None = None) -> str:
        """Where the trail is, for messages: the registry, the run and the artifact the head tag names."""
        tags = self._model_tags() if tags is None else tags
        run, head = tags.get(RUN_TAG), tags.get(HEAD_TAG)
        where = f"{self.client.tracking_uri} model {self.model!r}"
        if run:
            where += f", run {run}"
        return where + (f", artifact {TRAIL_DIR}/{head}.jsonl" if head else " (empty trail)")

    def _artifact_location(self) -> str | None:
        """Next to the model's own run artifacts (same store, same credentials); SQLite: ``<db dir>/mlartifacts``."""
        try:
            for mv in self.client.search_model_versions(f"name = '{self.model}'"):
                if mv.run_id:
                    exp = self.client.get_experiment(self.client.get_run(mv.run_id).info.experiment_id)
                    return str(exp.artifact_location)
        except MlflowException:
            pass
        uri = str(self.client.tracking_uri)
        if uri.startswith("sqlite:///"):
            return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
        return None

    def _ensure_run(self, tags: dict[str, str]) -> str:
        run = tags.get(RUN_TAG)
        if run:
            return run
        name = f"{EXPERIMENT_PREFIX}{self.model}"
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            name, artifact_location=self._artifact_location(), tags={"defectops.audit_model": self.model})
        run = self.client.create_run(str(exp_id), run_name="audit-trail",
                                     tags={"defectops.audit_model": self.model}).info.run_id
        self.client.set_registered_model_tag(self.model, RUN_TAG, run)
        return str(run)

    # ---------------------------------------------------------------------------------------------------- reads
    def _download(self, run: str, head: str) -> list[dict[str, Any]]:
        path = f"{TRAIL_DIR}/{head}.jsonl"
        with tempfile.TemporaryDirectory(prefix="defectops-audit-") as tmp:
            try:
                local = Path(self.client.download_artifacts(run, path, tmp))
            except (MlflowException, OSError):
                raise AuditError(f"the audit trail snapshot {path} named by tag {HEAD_TAG} is missing from run {run} "
                                 f"of {self.client.tracking_uri}; restore the run's artifacts from a backup") from None
            return audit.read_records(local)

    def _read(self, tags: dict[str, str]) -> list[dict[str, Any]]:
        run, head = tags.get(RUN_TAG), tags.get(HEAD_TAG)
        if not head:
            return []
        if not run:
            raise AuditError(f"registered model {self.model!r} has an audit head tag but no {RUN_TAG} tag; the "
                             "trail cannot be located (restore the tag)")
        return self._download(run, head)

    def check(self, *, mirrors: bool = True) -> TrailCheck:
        """Verify the trail the head tag names: it exists, its chain is intact, its last hash is the head, and (with
        ``mirrors``) the per-version tags ``defectops.audit.<seq>`` agree with it. Never raises for a bad trail."""
        try:
            tags = self._model_tags()
            where = self.location(tags)
            records = self._read(tags)
        except AuditError as e:
            return TrailCheck(False, [], str(e), None, f"{self.client.tracking_uri} model {self.model!r}")
        result = audit.verify(records)
        if not result.ok:
            return TrailCheck(False, records, result.problem, result.first_bad_seq, where)
        head = tags.get(HEAD_TAG)
        if records and records[-1].get("hash") != head:
            return TrailCheck(False, records, f"the trail's last record is not the head {head} (stale or substituted "
                                              "copy)", len(records) - 1, where)
        if mirrors:
            problem = self._mirror_problem(records)
            if problem:
                return TrailCheck(False, records, problem[1], problem[0], where)
        return TrailCheck(True, records, "", None, where)

    def _mirror_problem(self, records: list[dict[str, Any]]) -> tuple[int, str] | None:
        try:
            versions = self.client.search_model_versions(f"name = '{self.model}'")
        except MlflowException:
            return None
        for mv in sorted(versions, key=lambda v: int(v.version)):
            for key, value in dict(mv.tags).items():
                if not key.startswith(MIRROR_PREFIX) or not key.removeprefix(MIRROR_PREFIX).isdigit():
                    continue
                seq = int(key.removeprefix(MIRROR_PREFIX))
                try:
                    mirrored = json.loads(value).get("hash")
                except (json.JSONDecodeError, AttributeError):
                    mirrored = None
                if seq >= len(records):
                    return seq, (f"version {mv.version} carries audit record {seq} but the trail has only "
                                 f"{len(records)} records (cut short, rolled back, or a lost concurrent append)")
                if records[seq].get("hash") != mirrored:
                    return seq, (f"version {mv.version} mirrors audit record {seq} with another hash than the trail "
                                 "(record replaced, or a lost concurrent append)")
        return None

    def records(self) -> list[dict[str, Any]]:
        """The verified records (chain and head; mirrors are checked by :meth:`check`); raises :class:`AuditError`."""
        result = self.check(mirrors=False)
        if not result.ok:
            raise AuditError(f"audit trail at {result.location} is broken at record {result.first_bad_seq}: "
                             f"{result.problem}; restore it before recording new decisions")
        return result.records

    # --------------------------------------------------------------------------------------------------- append
    def append(self, *, actor: str, role: str, action: str, version: str, previous_champion: str | None,
               reason: str, evidence: str, identity: str = "") -> AuditRecord:
        """Verify the trail, upload the extended snapshot, then move the head tag to it. Callers that also change the
        registry hold :meth:`locked` around both (as :mod:`registry.governance` does); this locks appends itself."""
        with audit.locked(self._lock_file("append")):
            records = self.records()
            prev = AuditRecord.from_dict(records[-1]) if records else None
            rec = audit.make_record(prev, actor=actor, role=role, action=action, model=self.model,
                                    version=version, previous_champion=previous_champion, reason=reason,
                                    evidence=evidence, identity=identity)
            run = self._ensure_run(self._model_tags())
            body = _canonical_lines([*records, rec.to_dict()])
            with tempfile.TemporaryDirectory(prefix="defectops-audit-") as tmp:
                snapshot = Path(tmp) / f"{rec.hash}.jsonl"
                snapshot.write_bytes(body)
                try:
                    self.client.log_artifact(run, str(snapshot), TRAIL_DIR)
                    self.client.set_registered_model_tag(self.model, HEAD_TAG, rec.hash)  # the commit point
                except (MlflowException, OSError) as e:
                    raise AuditError(f"could not store the audit trail of {self.model!r} in "
                                     f"{self.client.tracking_uri}: {str(e)[:200]}") from None
                latest = Path(tmp) / LATEST
                latest.write_bytes(body)
                try:  # a convenience copy only: the record is committed once the head tag names its snapshot
                    self.client.log_artifact(run, str(latest))
                except (MlflowException, OSError) as e:
                    log.warning("audit record %s committed; refreshing %s failed: %s", rec.seq, LATEST, e)
            return rec
