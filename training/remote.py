"""Dataset snapshots in S3: content-addressed push and pull, resumable, verified end to end.

Why: a training run must be reproducible on any machine from a fingerprint alone, identical files must be stored once
however many snapshots hold them, and neither a crash nor a corrupt object may ever yield a snapshot that looks
complete but is not.

Layout under ``s3://bucket/prefix``::

    objects/<sha256[:2]>/<sha256>                   every file, keyed by the SHA-256 of its bytes (dedup)
    snapshots/<fingerprint>/manifest.jsonl          canonical manifest (paths as in the local snapshot)
    snapshots/<fingerprint>/classes.json
    snapshots/<fingerprint>/snapshot.json           uploaded LAST: its presence marks the snapshot complete
    snapshots/latest                                text: fingerprint of the snapshot pushed last

The remote ``snapshot.json`` says ``files_root: "."`` (a pulled snapshot is self-contained: files at ``dest/<path>``)
and adds ``files``, a ``{path: sha256}`` map of every file, so files whose manifest entry has no ``sha256`` can be
found too. Uploads carry ``Content-MD5`` and ``x-amz-checksum-sha256`` so the server rejects bytes altered in
transit; downloads are hashed and compared with the key before they are kept.

URIs: push takes ``s3://bucket/prefix``. Pull and :func:`remote_fingerprint` take ``s3://bucket/prefix`` (the
``latest`` snapshot) or ``s3://bucket/prefix@<fingerprint>`` (a pinned one); a prefix therefore cannot contain ``@``.

A pull works in ``<dest>.partial`` (files verified one by one; a crash keeps them for the next try) and renames the
finished tree to ``dest`` in one step. Run one pull per ``dest`` at a time.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from defectops.core.fsutil import read_json, sha256_file, write_bytes
from defectops.training.snapshot import (
    CLASSES,
    MANIFEST,
    META,
    Snapshot,
    canonical_manifest,
    fingerprint,
    load_snapshot,
)

S3Client = Any  # botocore's generated client class has no static type
Progress = Callable[[int], None]
T = TypeVar("T")
R = TypeVar("R")

OBJECTS = "objects"
SNAPSHOTS = "snapshots"
LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
MAX_PUT_BYTES = 5 * 1024**3  # S3's limit for a single PUT
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
           "AllAccessDisabled", "AccountProblem", "InvalidSecurity"}
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_BAD_DIGEST = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "XAmzContentChecksumMismatch",
               "InvalidChecksum"}


class RemoteError(RuntimeError):
    """S3 could not be reached or refused a request, or sent data that fails verification."""


@dataclass(frozen=True)
class TransferResult:
    """Outcome of a push: file objects uploaded and skipped (already present), bytes sent, and the pinned URI."""

    fingerprint: str
    uploaded: int
    skipped: int
    bytes: int
    uri: str


# ---------------------------------------------------------------------------------------------------------- URIs


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix/`` -> ``("bucket", "prefix")``; the prefix may be empty. ``ValueError`` otherwise."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an S3 URI: write it as s3://bucket/prefix")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.rstrip("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{1,254}", bucket):
        raise ValueError(f"{uri!r} has no valid bucket name: write it as s3://bucket/prefix")
    if prefix.startswith("/") or "//" in prefix:
        raise ValueError(f"{uri!r} has an empty path segment: remove the doubled '/'")
    return bucket, prefix


def _split_ref(uri: str) -> tuple[str, str, str | None]:
    """``s3://bucket/prefix[@fingerprint]`` -> ``(bucket, prefix, fingerprint or None)``."""
    ref: str | None = None
    if "@" in uri:
        uri, _, ref = uri.rpartition("@")
        if ref == LATEST:
            ref = None
        elif not _SHA256.fullmatch(ref):
            raise ValueError(f"{ref!r} after '@' is not a snapshot fingerprint: use 64 lowercase hex digits or "
                             f"'latest'")
    bucket, prefix = parse_s3_uri(uri)
    return bucket, prefix, ref


def _key(prefix: str, *parts: str) -> str:
    return "/".join(p for p in (prefix, *parts) if p)


def object_key(prefix: str, sha256: str) -> str:
    """Key of the object holding the file whose SHA-256 is ``sha256``."""
    return _key(prefix, OBJECTS, sha256[:2], sha256)


def snapshot_key(prefix: str, fp: str, name: str) -> str:
    """Key of a snapshot's ``manifest.jsonl``, ``classes.json`` or ``snapshot.json``."""
    return _key(prefix, SNAPSHOTS, fp, name)


def _uri(bucket: str, prefix: str) -> str:
    return f"s3://{_key(bucket, prefix)}"


# -------------------------------------------------------------------------------------------------------- client


def s3_client(endpoint_url: str | None = None, *, region: str | None = None, access_key: str | None = None,
              secret_key: str | None = None, connect_timeout: float = 5.0, read_timeout: float = 60.0,
              retries: int = 3) -> S3Client:
    """A thread-safe S3 client: SigV4, standard retries, bounded timeouts.

    The endpoint is ``endpoint_url``, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS itself; with an
    explicit endpoint (SeaweedFS, MinIO...) addressing is path-style. Credentials come from the usual boto3 chain
    unless given here.
    """
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    session = boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key)
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path" if endpoint else "auto"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": retries, "mode": "standard"},
        max_pool_connections=32,
    )
    return session.client("s3", endpoint_url=endpoint, region_name=region or session.region_name or "us-east-1",
                          config=config)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _as_remote_error(e: BaseException, client: S3Client, bucket: str, key: str | None) -> RemoteError | None:
    """The one-line ``RemoteError`` for a botocore failure, or ``None`` if ``e`` is not one."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        IncompleteReadError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    endpoint = client.meta.endpoint_url
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    if isinstance(e, NoCredentialsError | PartialCredentialsError):
        return RemoteError(f"no usable AWS credentials for {where} ({_one_line(e)}): set AWS_ACCESS_KEY_ID and "
                           f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(e, EndpointConnectionError):  # includes connect timeouts
        return RemoteError(f"S3 endpoint {endpoint} unreachable while accessing {where}: check AWS_ENDPOINT_URL / "
                           f"network, then retry (transfers resume)")
    if isinstance(e, ReadTimeoutError):
        return RemoteError(f"S3 endpoint {endpoint} timed out on {where}: retry (transfers resume) or check the "
                           f"server's health")
    if isinstance(e, ConnectionClosedError | ResponseStreamingError | IncompleteReadError):
        return RemoteError(f"connection to S3 endpoint {endpoint} dropped during {where}: retry (transfers resume)")
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))
        if code == "NoSuchBucket" or (code in _NOT_FOUND and key is None):
            return RemoteError(f"S3 bucket {bucket} does not exist at {endpoint}: create it or fix the URI")
        if code in _DENIED:
            return RemoteError(f"S3 access denied to {where} ({code}): check the AWS credentials "
                               f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE) and the bucket policy")
        if code in _BAD_DIGEST:
            return RemoteError(f"S3 rejected {where} ({code}): the bytes changed in transit or on disk during the "
                               f"upload; retry")
        return RemoteError(f"S3 request on {where} failed ({code}: {_one_line(err.get('Message', ''))}): "
                           f"check the server at {endpoint}, then retry")
    if isinstance(e, BotoCoreError):
        return RemoteError(f"S3 request on {where} via {endpoint} failed ({_one_line(e)}): check the endpoint and "
                           f"credentials, then retry")
    return None


@contextlib.contextmanager
def _s3_errors(client: S3Client, bucket: str, key: str | None = None) -> Iterator[None]:
    try:
        yield
    except RemoteError:
        raise
    except Exception as e:
        err = _as_remote_error(e, client, bucket, key)
        if err is None:
            raise
        raise err from e


def _not_found(e: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(e, ClientError) and str(e.response.get("Error", {}).get("Code")) in _NOT_FOUND


def _check_bucket(client: S3Client, bucket: str) -> None:
    with _s3_errors(client, bucket):
        client.head_bucket(Bucket=bucket)


def _head_size(client: S3Client, bucket: str, key: str) -> int | None:
    """Size of the object at ``key``, ``None`` if there is none."""
    with _s3_errors(client, bucket, key):
        try:
            return int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except Exception as e:
            if _not_found(e):
                return None
            raise


def _get_bytes(client: S3Client, bucket: str, key: str) -> bytes | None:
    """A small object's bytes, ``None`` if there is none."""
    with _s3_errors(client, bucket, key):
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as e:
            if _not_found(e):
                return None
            raise
        with contextlib.closing(body):
            return bytes(body.read())


def _put(client: S3Client, bucket: str, key: str, body: Any, *, size: int, md5: bytes, sha256: bytes,
         content_type: str = "application/octet-stream") -> None:
    """PUT with Content-MD5 and x-amz-checksum-sha256: the server refuses bytes that differ from what was hashed."""
    with _s3_errors(client, bucket, key):
        client.put_object(Bucket=bucket, Key=key, Body=body, ContentLength=size, ContentType=content_type,
                          ContentMD5=base64.b64encode(md5).decode(), ChecksumSHA256=base64.b64encode(sha256).decode())


def _put_bytes(client: S3Client, bucket: str, key: str, data: bytes, content_type: str) -> None:
    _put(client, bucket, key, data, size=len(data), md5=hashlib.md5(data, usedforsecurity=False).digest(),
         sha256=hashlib.sha256(data).digest(), content_type=content_type)


# ------------------------------------------------------------------------------------------------------- helpers


def _check_rel(rel: object, where: str) -> str:
    """A manifest path that stays inside the snapshot folder and does not shadow its metadata files."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise ValueError(f"{where}: file path {rel!r} is not a relative POSIX path: fix the manifest")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or str(p) in (".", MANIFEST, CLASSES, META):
        raise ValueError(f"{where}: file path {rel!r} escapes the snapshot folder or shadows its metadata: "
                         f"fix the manifest")
    return str(p)


def _check_sha(sha: object, rel: str, where: str) -> str:
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ValueError(f"{where}: sha256 {sha!r} of {rel} is not 64 lowercase hex digits: fix the manifest")
    return sha


def _manifest_files(samples: Iterable[dict[str, Any]], where: str) -> dict[str, str | None]:
    """``{path: sha256 or None}`` for every file the samples reference (tested image and template)."""
    files: dict[str, str | None] = {}
    for i, s in enumerate(samples, 1):
        for path_key, sha_key in (("path", "sha256"), ("template", "template_sha256")):
            if path_key not in s:
                if path_key == "path":
                    raise ValueError(f"{where} sample {i} has no 'path': fix the manifest")
                continue
            rel = _check_rel(s[path_key], where)
            sha = _check_sha(s[sha_key], rel, where) if s.get(sha_key) is not None else None
            if files.get(rel) is not None and sha is not None and files[rel] != sha:
                raise ValueError(f"{where}: {rel} is listed with two different sha256 values: fix the manifest")
            if files.get(rel) is None:
                files[rel] = sha
    return files


def _digests(path: Path) -> tuple[str, bytes, int]:
    """SHA-256 (hex), MD5 (raw) and size of a file, in one read."""
    sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            sha.update(block)
            md5.update(block)
            size += len(block)
    return sha.hexdigest(), md5.digest(), size


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _check_workers(workers: int) -> None:
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1")


def _parallel(fn: Callable[[T], tuple[int, R]], items: Iterable[T], workers: int,
              progress: Progress | None) -> list[R]:
    """Run ``fn`` on every item in a thread pool; ``progress(n)`` is called in this thread as each one finishes.

    ``fn`` returns ``(bytes transferred, result)``. The first failure cancels what has not started and is re-raised
    once the running calls have returned.
    """
    _check_workers(workers)
    results: list[R] = []
    ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3")
    futures: list[Future[tuple[int, R]]] = [ex.submit(fn, it) for it in items]
    try:
        for fut in as_completed(futures):
            n, res = fut.result()
            results.append(res)
            if progress is not None:
                progress(n)
    except BaseException:
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown(wait=True)
    return results


# ---------------------------------------------------------------------------------------------------------- push


def push_snapshot(snapshot_dir: Path, uri: str, *, workers: int = 8, client: S3Client | None = None,
                  progress: Progress | None = None) -> TransferResult:
    """Upload a local snapshot to ``s3://bucket/prefix``; idempotent and resumable.

    Objects already present with the right size are skipped (the key is the content hash); a file whose bytes differ
    from its manifest ``sha256`` is refused. Metadata goes up only after every object, ``snapshot.json`` last, then
    ``latest`` is pointed at the snapshot. ``progress(bytes_sent)`` is called once per file object (0 if skipped).
    """
    _check_workers(workers)
    bucket, prefix, ref = _split_ref(uri)
    if ref is not None:
        raise ValueError(f"push takes s3://bucket/prefix, not the pinned {uri!r}: the fingerprint comes from the "
                         f"snapshot")
    snap = load_snapshot(Path(snapshot_dir))
    where = str(snap.dir / MANIFEST)
    fp = fingerprint(snap.samples, snap.classes)
    if fp != snap.fingerprint:
        raise ValueError(f"snapshot {snap.dir} is inconsistent: its manifest hashes to {fp} but {META} says "
                         f"{snap.fingerprint}: re-create the snapshot")
    files = _manifest_files(snap.samples, where)
    for rel in files:  # PathEscapesRoot for a symlink out of the files root, before anything is read or uploaded
        snap.file(rel)
    client = client if client is not None else s3_client()
    _check_bucket(client, bucket)

    claimed: set[str] = set()
    lock = threading.Lock()

    def push_one(item: tuple[str, str | None]) -> tuple[int, tuple[str, str, bool]]:
        rel, expected = item
        path = snap.file(rel)
        if not path.is_file():
            raise FileNotFoundError(f"{path} listed in {where} does not exist: restore it or re-create the snapshot")
        sha, md5, size = _digests(path)
        if expected is not None and sha != expected:
            raise ValueError(f"{path} does not match its sha256 in {where} (file {sha}, manifest {expected}): the "
                             f"file changed after the snapshot was written; re-create the snapshot")
        if size > MAX_PUT_BYTES:
            raise ValueError(f"{path} is {size} bytes, over S3's 5 GiB single-PUT limit: split the file")
        key = object_key(prefix, sha)
        with lock:
            duplicate = sha in claimed
            claimed.add(sha)
        if duplicate or _head_size(client, bucket, key) == size:
            return 0, (rel, sha, False)
        with open(path, "rb") as f:
            _put(client, bucket, key, f, size=size, md5=md5, sha256=bytes.fromhex(sha))
        return size, (rel, sha, True)

    sent = 0

    def track(n: int) -> None:
        nonlocal sent
        sent += n
        if progress is not None:
            progress(n)

    done = _parallel(push_one, sorted(files.items()), workers, track)
    uploaded = sum(1 for _, _, up in done if up)
    shas = {rel: sha for rel, sha, _ in done}

    meta_key = snapshot_key(prefix, fp, META)
    if _head_size(client, bucket, meta_key) is None:
        meta = {**read_json(snap.dir / META), "fingerprint": fp, "files_root": ".",
                "files": dict(sorted(shas.items()))}
        _put_bytes(client, bucket, snapshot_key(prefix, fp, MANIFEST),
                   canonical_manifest(snap.samples).encode(), "application/x-ndjson")
        _put_bytes(client, bucket, snapshot_key(prefix, fp, CLASSES), _json_bytes(list(snap.classes)),
                   "application/json")
        _put_bytes(client, bucket, meta_key, _json_bytes(meta), "application/json")  # last: marks complete
    _put_bytes(client, bucket, _key(prefix, SNAPSHOTS, LATEST), fp.encode(), "text/plain")
    return TransferResult(fingerprint=fp, uploaded=uploaded, skipped=len(done) - uploaded, bytes=sent,
                          uri=f"{_uri(bucket, prefix)}@{fp}")


# ---------------------------------------------------------------------------------------------------------- pull


def _resolve(client: S3Client, bucket: str, prefix: str, ref: str | None) -> str | None:
    """The fingerprint ``ref`` names (``None``: the ``latest`` pointer), or ``None`` if there is no pointer."""
    if ref is not None:
        return ref
    raw = _get_bytes(client, bucket, _key(prefix, SNAPSHOTS, LATEST))
    if raw is None:
        return None
    fp = raw.decode("utf-8", "replace").strip()
    if not _SHA256.fullmatch(fp):
        raise RemoteError(f"{_uri(bucket, prefix)}/{SNAPSHOTS}/{LATEST} holds {fp[:80]!r}, not a fingerprint: "
                          f"push a snapshot again to repair it")
    return fp


def remote_fingerprint(uri: str, *, client: S3Client | None = None) -> str | None:
    """Fingerprint of the complete snapshot ``uri`` names (``latest`` or ``@<fingerprint>``); ``None`` if absent or
    incomplete. A missing bucket or refused access raises ``RemoteError``."""
    bucket, prefix, ref = _split_ref(uri)
    client = client if client is not None else s3_client()
    fp = _resolve(client, bucket, prefix, ref)
    if fp is not None and _head_size(client, bucket, snapshot_key(prefix, fp, META)) is not None:
        return fp
    _check_bucket(client, bucket)  # tell "no such bucket" apart from "no such snapshot"
    return None


def _cached(dest: Path, fp: str) -> Snapshot | None:
    """The complete snapshot ``fp`` already at ``dest``, else ``None``; a different snapshot there is an error."""
    if not dest.exists():
        return None
    try:
        snap = load_snapshot(dest)
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError):
        snap = None
    if snap is not None and snap.fingerprint == fp:
        complete = (snap.files_root == dest.resolve() and fingerprint(snap.samples, snap.classes) == fp
                    and all(snap.file(rel).is_file() for rel in _manifest_files(snap.samples, str(dest / MANIFEST))))
        if complete:
            return snap
        raise FileExistsError(f"{dest} holds an incomplete or altered copy of snapshot {fp}: remove it and pull again")
    held = snap.fingerprint if snap is not None else "something else"
    raise FileExistsError(f"{dest} already exists and holds {held}, not snapshot {fp}: remove it or pull into "
                          f"another folder")


def _prepare_partial(partial: Path, fp: str) -> tuple[Path, Path]:
    """``(tree, tmp)`` inside ``partial``, kept from an interrupted pull of the same snapshot, else fresh."""
    marker = partial / "fingerprint"
    if partial.exists() and not (marker.is_file() and marker.read_text(encoding="utf-8").strip() == fp):
        shutil.rmtree(partial)
    tree, tmp = partial / "tree", partial / "tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # half-written downloads from a crash
    tree.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        write_bytes(marker, fp.encode())
    return tree, tmp


# One function on purpose (verified, resumable download: each failure mode is one branch).
def pull_snapshot(uri: str, dest: Path, *, workers: int = 8, client: S3Client | None = None,  # noqa: C901
                  progress: Progress | None = None) -> Snapshot:
    """Download the snapshot ``uri`` names into ``dest`` (created whole or not at all) and return it.

    Every file is checked against its SHA-256 before it is kept; a mismatch raises ``RemoteError`` naming the file
    and the object key. A complete copy already at ``dest`` is returned as is (for a pinned ``@fingerprint`` without
    any request; for ``latest`` after reading the pointer only). Files verified by an interrupted pull are kept in
    ``<dest>.partial`` and not fetched again. ``progress(bytes_received)`` is called once per object (0 if kept).
    """
    _check_workers(workers)
    bucket, prefix, ref = _split_ref(uri)
    dest = Path(dest)
    if ref is not None and (hit := _cached(dest, ref)) is not None:
        return hit
    client = client if client is not None else s3_client()
    fp = _resolve(client, bucket, prefix, ref)
    if fp is None:
        _check_bucket(client, bucket)
        raise RemoteError(f"no snapshot at {_uri(bucket, prefix)} ({SNAPSHOTS}/{LATEST} is missing): push one first "
                          f"or pin one with @<fingerprint>")
    if ref is None and (hit := _cached(dest, fp)) is not None:
        return hit
    pinned = f"{_uri(bucket, prefix)}@{fp}"

    meta_raw = _get_bytes(client, bucket, snapshot_key(prefix, fp, META))
    if meta_raw is None:
        _check_bucket(client, bucket)
        raise RemoteError(f"snapshot {pinned} is absent or incomplete (no {META}): push it (again) first")
    manifest_raw = _get_bytes(client, bucket, snapshot_key(prefix, fp, MANIFEST))
    classes_raw = _get_bytes(client, bucket, snapshot_key(prefix, fp, CLASSES))
    if manifest_raw is None or classes_raw is None:
        raise RemoteError(f"snapshot {pinned} has {META} but lacks {MANIFEST} or {CLASSES}: push it again")
    try:
        meta = json.loads(meta_raw)
        classes = json.loads(classes_raw)
        samples = [json.loads(line) for line in manifest_raw.decode("utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RemoteError(f"snapshot {pinned} has unreadable metadata ({_one_line(e)}): push it again") from None
    got = fingerprint(samples, classes)
    if got != fp or meta.get("fingerprint") != fp:
        raise RemoteError(f"snapshot {pinned} is corrupt: its manifest hashes to {got} and its {META} says "
                          f"{meta.get('fingerprint')}: push it again from a good copy")
    where = f"{pinned}/{MANIFEST}"
    listed = _manifest_files(samples, where)
    index = meta.get("files") or {}
    if not isinstance(index, dict):
        raise RemoteError(f"snapshot {pinned} has a malformed 'files' map in {META}: push it again")
    if meta.get("files_root", ".") != ".":  # the pulled copy is self-contained whatever the pusher wrote
        meta_raw = _json_bytes({**meta, "files_root": "."})
    files: dict[str, str] = {}
    for rel, sha in listed.items():
        indexed = index.get(rel)
        if sha is not None and indexed is not None and indexed != sha:
            raise RemoteError(f"snapshot {pinned} is corrupt: {rel} has sha256 {sha} in the manifest but {indexed} "
                              f"in {META}: push it again")
        if (sha := sha or indexed) is None:
            raise RemoteError(f"snapshot {pinned} gives no sha256 for {rel}: push it again with this version")
        files[rel] = _check_sha(sha, rel, where)

    by_sha: dict[str, list[str]] = {}
    for rel, sha in sorted(files.items()):
        by_sha.setdefault(sha, []).append(rel)

    partial = dest.with_name(dest.name + PARTIAL_SUFFIX)
    tree, tmp = _prepare_partial(partial, fp)

    def fetch(item: tuple[str, list[str]]) -> tuple[int, None]:
        sha, rels = item
        missing = [rel for rel in rels if not ((tree / rel).is_file() and sha256_file(tree / rel) == sha)]
        if not missing:
            return 0, None
        key = object_key(prefix, sha)
        part = tmp / f"{sha}.part"
        h, size = hashlib.sha256(), 0
        with _s3_errors(client, bucket, key):
            try:
                body = client.get_object(Bucket=bucket, Key=key)["Body"]
            except Exception as e:
                if _not_found(e):
                    raise RemoteError(f"object {key} for {missing[0]} is missing from s3://{bucket}: snapshot "
                                      f"{pinned} is damaged; push it again") from None
                raise
            with contextlib.closing(body), open(part, "wb") as out:
                for block in body.iter_chunks(_CHUNK):
                    h.update(block)
                    out.write(block)
                    size += len(block)
        if h.hexdigest() != sha:
            part.unlink(missing_ok=True)
            raise RemoteError(f"{missing[0]} is corrupt or tampered in S3: object s3://{bucket}/{key} hashes to "
                              f"{h.hexdigest()}; push snapshot {fp} again from a good copy")
        for i, rel in enumerate(missing):
            target = tree / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if i == len(missing) - 1:
                os.replace(part, target)
            else:
                copy = tmp / f"{sha}.{i}.part"
                shutil.copyfile(part, copy)
                os.replace(copy, target)
        return size, None

    _parallel(fetch, sorted(by_sha.items()), workers, progress)

    write_bytes(tree / MANIFEST, manifest_raw)
    write_bytes(tree / CLASSES, classes_raw)
    write_bytes(tree / META, meta_raw)  # last, as in write_snapshot
    if dest.exists() and (hit := _cached(dest, fp)) is not None:  # another pull finished first
        return hit
    os.rename(tree, dest)
    shutil.rmtree(partial, ignore_errors=True)
    return load_snapshot(dest)
