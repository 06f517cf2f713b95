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

Concurrency: appends and the decisions around them are serialised by an ``fcntl`` lock. On a **SQLite** registry
the lock file lives beside the database (``.<db name>.defectops-locks/``): a database-level lock that every process
using that database takes, whatever its ``$DEFECTOPS_HOME`` (the CLI, the review server, other users' pipelines; a
SQLite registry is one host's, or one shared file system's, by nature). Otherwise the lock is in a local ``lock_dir``
(default ``$DEFECTOPS_HOME``), which covers the processes on one host that share it. Across hosts it depends on the
artifact store of the trail's run:

* **S3** (the run's artifact URI is ``s3://...``, i.e. the client writes to S3 itself): every record is also its own
  object ``records/<seq:08d>-<prev_hash[:16]>.json`` under the run's artifact root, written with a conditional put
  (``If-None-Match: *``). Two hosts appending after the same head race for the same key and the store lets exactly
  one write it; the loser gets ``412 PreconditionFailed``, re-reads the trail and retries after the winner (plain
  :meth:`RegistryTrail.append`) or, when it appended ``after=`` a head it had based a decision on (as
  :mod:`registry.governance` does), is refused with :class:`TrailConflict` and changes nothing. Readers list
  ``records/``, follow the chain from the genesis key by key, verify it, and report any record object off the chain.
  The head tag and ``audit.jsonl`` are then only hints written after the commit (they may lag); the head tag must
  name a record of the chain, so a trail cut short below it is caught. SeaweedFS 4.48 (the test server) and AWS S3
  honour ``If-None-Match: *``; a store that ignores it would bring back the race below.
* **Anything else** (a local folder, the ``mlflow-artifacts`` proxy of a tracking server, a SQL registry): MLflow has
  no compare-and-set for tags, so two *hosts* appending at the same moment can both read head H and both publish a
  successor: the last tag write wins and the other record drops out of the chain. The loss is not silent: the loser's
  snapshot stays in ``trail/`` and its version tag ``defectops.audit.<seq>`` disagrees with the trail, which
  :meth:`RegistryTrail.check` (``defectops registry audit --verify``) reports. Decide from one host (one review
  server per registry) there, or use a SQL registry: on PostgreSQL every decision also holds a session-level advisory
  lock in the registry's database (``pg_advisory_lock``), which serialises deciders on every host; on SQLite the lock
  file beside the database does the same for every process that can open it.

Limits in both modes: the registry writes that follow an append (aliases, tags) are not transactional with it, and
two hosts creating the trail's run for a model's very first record at the same instant can create two runs (the
pipeline's ``register`` record comes first, from one place). An S3 trail is read with one GET per record.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import urllib.parse
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

__all__ = ["CAS_ATTEMPTS", "EXPERIMENT_PREFIX", "HEAD_TAG", "LATEST", "MIRROR_PREFIX", "RECORDS_DIR", "RUN_TAG",
           "TRAIL_DIR", "RegistryTrail", "S3Records", "TrailCheck", "TrailConflict", "record_key"]

EXPERIMENT_PREFIX = "defectops-audit/"
HEAD_TAG = "defectops.audit_head"
RUN_TAG = "defectops.audit_run"
MIRROR_PREFIX = T.AUDIT_PREFIX
TRAIL_DIR = "trail"
LATEST = "audit.jsonl"
RECORDS_DIR = "records"
CAS_ATTEMPTS = 5
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrailCheck:
    """Outcome of :meth:`RegistryTrail.check`: ``records`` are what the head tag names (possibly empty)."""

    ok: bool
    records: list[dict[str, Any]] = field(default_factory=list)
    problem: str = ""
    first_bad_seq: int | None = None
    location: str = ""
    per_record: bool = False  # read from S3 per-record objects (conditional appends), not from a snapshot


class TrailConflict(AuditError):
    """Another writer appended to the trail after the head this append was based on (a lost compare-and-set)."""


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _canonical_lines(records: list[dict[str, Any]]) -> bytes:
    return b"".join(_canonical(r) + b"\n" for r in records)


def record_key(seq: int, prev_hash: str) -> str:
    """The object name of a record, relative to the run's artifact root: one key per (position, predecessor), so
    two writers extending the same head compete for the same key."""
    return f"{RECORDS_DIR}/{seq:08d}-{prev_hash[:16]}.json"


def _assemble(objects: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Follow the chain from the genesis key; returns the chain and the keys left off it (sorted)."""
    left = dict(objects)
    chain: list[dict[str, Any]] = []
    prev = audit.GENESIS
    while (rec := left.pop(record_key(len(chain), prev), None)) is not None:
        chain.append(rec)
        prev = str(rec.get("hash"))
    return chain, sorted(left)


class S3Records:
    """The per-record objects of a trail under ``artifact_uri`` (``s3://bucket/prefix``), written conditionally.

    The client is MLflow's own S3 client for that URI (``MLFLOW_S3_ENDPOINT_URL``, the usual AWS credentials)."""

    def __init__(self, artifact_uri: str) -> None:
        from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

        repo: Any = S3ArtifactRepository(artifact_uri)  # untyped; its client honours MLFLOW_S3_ENDPOINT_URL
        self.uri = artifact_uri.rstrip("/")
        parsed = urllib.parse.urlparse(artifact_uri)
        self.bucket, root = parsed.netloc, parsed.path.strip("/")
        self.root = f"{root}/" if root else ""
        self.s3: Any = repo._get_s3_client()

    def _fail(self, what: str, e: Exception) -> AuditError:
        return AuditError(f"could not {what} the audit records under {self.uri}/{RECORDS_DIR}: {str(e)[:200]}")

    def read(self) -> dict[str, dict[str, Any]]:
        """Every record object, by key relative to the artifact root; :class:`AuditError` on I/O or bad JSON."""
        from botocore.exceptions import BotoCoreError, ClientError

        out: dict[str, dict[str, Any]] = {}
        try:
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=f"{self.root}{RECORDS_DIR}/")
            for page in pages:
                for obj in page.get("Contents", []):
                    body = self.s3.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
                    try:
                        out[obj["Key"].removeprefix(self.root)] = json.loads(body)
                    except json.JSONDecodeError:
                        raise AuditError(f"audit record {self.uri}/{obj['Key'].removeprefix(self.root)} is not "
                                         "JSON; restore it from a backup") from None
        except (BotoCoreError, ClientError) as e:
            raise self._fail("read", e) from None
        return out

    def put(self, record: dict[str, Any]) -> bool:
        """Write ``record`` at its key unless that key exists (``If-None-Match: *``); ``False`` when another writer
        holds the key (412, or AWS's 409 for a conditional write racing another)."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = record_key(int(record["seq"]), str(record["prev_hash"]))
        try:
            self.s3.put_object(Bucket=self.bucket, Key=f"{self.root}{key}", Body=_canonical(record),
                               ContentType="application/json", IfNoneMatch="*")
        except ClientError as e:
            err = e.response.get("Error", {})
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if err.get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            raise self._fail("write", e) from None
        except BotoCoreError as e:
            raise self._fail("write", e) from None
        return True

    def get(self, key: str) -> dict[str, Any] | None:
        """The record at ``key`` (``None`` when absent)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=f"{self.root}{key}")["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._fail("read", e) from None
        except BotoCoreError as e:
            raise self._fail("read", e) from None
        try:
            return dict(json.loads(body))
        except json.JSONDecodeError:
            raise AuditError(f"audit record {self.uri}/{key} is not JSON; restore it from a backup") from None


@dataclass(frozen=True)
class _Loaded:
    """What a read found: the records, whether they came from per-record objects (S3), and any object left off."""

    records: list[dict[str, Any]]
    cas: bool = False
    off_chain: list[str] = field(default_factory=list)


class RegistryTrail:
    """The audit trail of ``model`` in the registry behind ``client``; ``lock_dir`` holds the same-host locks."""

    def __init__(self, client: MlflowClient, model: str, lock_dir: Path) -> None:
        audit.audit_path(Path(lock_dir), model)  # validates the model name for use in file names
        self.client = client
        self.model = model
        self.lock_dir = Path(lock_dir)
        self._stores: dict[str, S3Records | None] = {}

    # ------------------------------------------------------------------------------------------------ locking
    def _lock_file(self, kind: str) -> Path:
        """The lock of this model's decisions (``kind``: ``decide`` or ``append``). On a SQLite registry it lives
        beside the database file, so every process that uses that database takes the same lock whatever its
        ``lock_dir`` (``$DEFECTOPS_HOME``): the CLI, the review server and the pipeline of different users.
        ``DEFECTOPS_AUDIT_LOCK_DIR`` puts the locks elsewhere (every party of one registry must then name the same
        folder)."""
        override = os.environ.get("DEFECTOPS_AUDIT_LOCK_DIR")
        if override:
            return Path(override) / f"{self.model}.{kind}.lock"
        uri = str(getattr(self.client, "tracking_uri", "") or "")
        if uri.startswith("sqlite:///"):
            db = Path(uri.removeprefix("sqlite:///"))
            return db.parent / f".{db.name}.defectops-locks" / f"{self.model}.{kind}.lock"
        return self.lock_dir / "audit" / f"{self.model}.{kind}.lock"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The decision lock: hold it around the registry checks and writes that go with an append."""
        with self._locks("decide"):
            yield

    @contextmanager
    def _locks(self, kind: str) -> Iterator[None]:
        """The file lock of :meth:`_lock_file` and, on a PostgreSQL registry, a session-level advisory lock in that
        database (``pg_advisory_lock`` of a key derived from the model and ``kind``): every host deciding on the
        registry takes it, and it never blocks MLflow's own writes (an advisory lock only excludes other takers)."""
        with audit.locked(self._lock_file(kind)), _advisory_lock(self.client, f"{self.model}\0{kind}"):
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

    def _store(self, run: str) -> S3Records | None:
        """The conditional-write record store when the run's artifacts are on S3, else ``None``."""
        if run not in self._stores:
            try:
                uri = str(self.client.get_run(run).info.artifact_uri)
            except MlflowException:
                raise AuditError(f"the audit run {run} named by tag {RUN_TAG} of {self.model!r} is missing from "
                                 f"{self.client.tracking_uri}; restore it from a backup") from None
            self._stores[run] = S3Records(uri) if uri.startswith("s3://") else None
        return self._stores[run]

    def _read(self, tags: dict[str, str]) -> _Loaded:
        run, head = tags.get(RUN_TAG), tags.get(HEAD_TAG)
        if not run:
            if head:
                raise AuditError(f"registered model {self.model!r} has an audit head tag but no {RUN_TAG} tag; the "
                                 "trail cannot be located (restore the tag)")
            return _Loaded([])
        store = self._store(run)
        if store is not None:
            objects = store.read()
            if objects or not head:
                chain, off = _assemble(objects)
                return _Loaded(chain, True, off)
        # no per-record objects yet: the snapshot the head tag names (a trail written before conditional appends)
        return _Loaded(self._download(run, head) if head else [])

    def check(self, *, mirrors: bool = True) -> TrailCheck:
        """Verify the trail: it exists, its chain is intact, it ends at the head (snapshots) or contains the head and
        leaves no record object off the chain (S3 records), and (with ``mirrors``) the per-version tags
        ``defectops.audit.<seq>`` agree with it. Never raises for a bad trail."""
        try:
            tags = self._model_tags()
            where = self.location(tags)
            loaded = self._read(tags)
        except AuditError as e:
            return TrailCheck(False, [], str(e), None, f"{self.client.tracking_uri} model {self.model!r}")
        records = loaded.records
        result = audit.verify(records)
        if not result.ok:
            return TrailCheck(False, records, result.problem, result.first_bad_seq, where)
        head = tags.get(HEAD_TAG)
        if loaded.cas:
            if loaded.off_chain:
                off = ", ".join(loaded.off_chain[:3])
                return TrailCheck(False, records, f"{len(loaded.off_chain)} audit record object(s) are not on the "
                                                  f"chain (forged, edited, or the chain cut before them): {off}",
                                  len(records), where)
            if head and head not in {r.get("hash") for r in records}:
                return TrailCheck(False, records, f"the head tag names record {head[:16]}, which is not on the trail "
                                                  "(records deleted or the trail substituted)", len(records), where)
        elif records and records[-1].get("hash") != head:
            return TrailCheck(False, records, f"the trail's last record is not the head {head} (stale or substituted "
                                              "copy)", len(records) - 1, where)
        if mirrors:
            problem = self._mirror_problem(records)
            if problem:
                return TrailCheck(False, records, problem[1], problem[0], where)
        return TrailCheck(True, records, "", None, where, loaded.cas)

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
        return self._verified().records

    def _verified(self) -> TrailCheck:
        result = self.check(mirrors=False)
        if not result.ok:
            raise AuditError(f"audit trail at {result.location} is broken at record {result.first_bad_seq}: "
                             f"{result.problem}; restore it before recording new decisions")
        return result

    # --------------------------------------------------------------------------------------------------- append
    def head_hash(self) -> str:
        """The hash of the verified trail's last record (``audit.GENESIS`` when empty), to pass as ``after=``."""
        records = self.records()
        return str(records[-1]["hash"]) if records else audit.GENESIS

    def append(self, *, actor: str, role: str, action: str, version: str, previous_champion: str | None,
               reason: str, evidence: str, after: str | None = None, identity: str = "") -> AuditRecord:
        """Append the next record. ``after``: the hash of the record it must follow (``audit.GENESIS``: the first);
        if another writer got there first, :class:`TrailConflict` and nothing is written. Without ``after`` the record
        follows the current head, retrying up to :data:`CAS_ATTEMPTS` times when a concurrent append wins.

        On S3 the record is committed by a conditional put of its own object (see the module docstring), then the head
        tag and ``audit.jsonl`` are refreshed as hints. Elsewhere the extended snapshot is uploaded and the head tag
        moved to it (the commit point). Callers that also change the registry hold :meth:`locked` around both (as
        :mod:`registry.governance` does); this locks appends on this host itself."""
        with self._locks("append"):
            for attempt in range(1, CAS_ATTEMPTS + 1):
                trail = self._verified()
                records = trail.records
                head = str(records[-1]["hash"]) if records else audit.GENESIS
                if after is not None and head != after:
                    raise self._conflict(after, records)
                prev = AuditRecord.from_dict(records[-1]) if records else None
                rec = audit.make_record(prev, actor=actor, role=role, action=action, model=self.model,
                                        version=version, previous_champion=previous_champion, reason=reason,
                                        evidence=evidence, identity=identity)
                run = self._ensure_run(self._model_tags())
                store = self._store(run)
                if store is None:
                    self._publish(run, rec, [*records, rec.to_dict()], commit=True)
                    return rec
                if not trail.per_record:
                    self._seed(store, records)
                if store.put(rec.to_dict()):
                    self._publish(run, rec, [*records, rec.to_dict()], commit=False)
                    return rec
                if after is not None:
                    raise self._conflict(after, self.records())
                log.info("audit record %s of %s: another writer appended first (attempt %s); retrying after it",
                         rec.seq, self.model, attempt)
            raise TrailConflict(f"the audit trail of {self.model!r} in {self.client.tracking_uri} kept moving: "
                                f"{CAS_ATTEMPTS} appends lost to concurrent writers; try again")

    def _conflict(self, after: str, records: list[dict[str, Any]]) -> TrailConflict:
        seqs = [i for i, r in enumerate(records) if r.get("hash") == after]
        newer = records[seqs[0] + 1:] if seqs else records
        who = ", ".join(f"#{r.get('seq')} {r.get('action')} of version {r.get('version')} by {r.get('actor')}"
                        for r in newer[:3]) or "unknown"
        return TrailConflict(f"another decision on {self.model!r} was recorded concurrently ({who}); nothing was "
                             "changed: review the registry again and decide again")

    def _seed(self, store: S3Records, records: list[dict[str, Any]]) -> None:
        """Copy records read from a snapshot (a trail started before conditional appends) to per-record objects;
        idempotent, so two hosts seeding together agree."""
        for r in records:
            if not store.put(r) and store.get(record_key(int(r["seq"]), str(r["prev_hash"]))) != r:
                raise AuditError(f"audit record {r.get('seq')} under {store.uri}/{RECORDS_DIR} differs from the "
                                 "trail's snapshot; restore the trail before recording new decisions")

    def _publish(self, run: str, rec: AuditRecord, records: list[dict[str, Any]], *, commit: bool) -> None:
        """Snapshot + head tag (the commit point when ``commit``; hints after an S3 conditional put) + audit.jsonl."""
        body = _canonical_lines(records)
        with tempfile.TemporaryDirectory(prefix="defectops-audit-") as tmp:
            try:
                if commit:
                    snapshot = Path(tmp) / f"{rec.hash}.jsonl"
                    snapshot.write_bytes(body)
                    self.client.log_artifact(run, str(snapshot), TRAIL_DIR)
                self.client.set_registered_model_tag(self.model, HEAD_TAG, rec.hash)
            except (MlflowException, OSError) as e:
                if commit:
                    raise AuditError(f"could not store the audit trail of {self.model!r} in "
                                     f"{self.client.tracking_uri}: {str(e)[:200]}") from None
                log.warning("audit record %s committed; moving the head tag failed: %s", rec.seq, e)
            latest = Path(tmp) / LATEST
            latest.write_bytes(body)
            try:  # a convenience copy only: the record is committed already
                self.client.log_artifact(run, str(latest))
            except (MlflowException, OSError) as e:
                log.warning("audit record %s committed; refreshing %s failed: %s", rec.seq, LATEST, e)


@contextmanager
def _advisory_lock(client: MlflowClient, name: str) -> Iterator[None]:
    """``pg_advisory_lock`` on a dedicated connection for the duration (PostgreSQL registries only; a no-op else)."""
    uri = str(getattr(client, "tracking_uri", "") or "")
    if not uri.startswith("postgresql"):
        yield
        return
    import hashlib

    import sqlalchemy

    key = int.from_bytes(hashlib.sha256(f"defectops-audit\0{name}".encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()
