"""Run roots in S3: ``defectops step <name> --run-root s3://bucket/prefix`` mirrors the run root down, runs the step
on the local mirror, and mirrors what changed back up.

Why: on Argo every step runs in its own pod with an empty disk, so the run root (config, markers, data, checkpoints,
model, reports) must live in object storage between steps, while the steps themselves keep working on plain files.

How: a pod's local mirror is ``$DEFECTOPS_HOME/remote-runs/<sha256(uri)[:16]>``. :func:`pull_root` downloads every
object under the prefix whose local copy is missing or differs (the listing's ETag, the MD5 of a single-part upload,
is compared with the local file's MD5; each file is written under a temp name and renamed). :func:`push_root`
uploads every local file whose MD5 differs from the remote listing, each PUT carrying Content-MD5 and a SHA-256
checksum so the server refuses altered bytes, and uploads the step markers (``steps/*.json``) and ``summary.json``
last: a marker is never visible before the outputs it vouches for. Hidden files (``.*``: temp files of atomic writes)
are not uploaded. The step command pushes in a ``finally``, so a failed step still leaves its finished epochs'
checkpoints for the retry; a killed pod loses what it had not pushed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defectops.core.layout import RUN
from defectops.training.remote import RemoteError, _digests, _put, _s3_errors, parse_s3_uri, s3_client

__all__ = ["LAST", "SyncResult", "is_remote", "local_mirror", "pull_root", "push_root"]

LAST = (f"{RUN.steps}/", RUN.summary)  # keys uploaded after everything else, in this order


@dataclass(frozen=True)
class SyncResult:
    transferred: int
    skipped: int
    bytes: int


def is_remote(run_root: str) -> bool:
    return run_root.startswith("s3://")


def local_mirror(uri: str, home: Path) -> Path:
    """The local folder a remote run root is mirrored into on this machine."""
    return home / "remote-runs" / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


def _prefix(uri: str) -> tuple[str, str]:
    bucket, prefix = parse_s3_uri(uri)
    prefix = prefix.strip("/")
    if not prefix:
        raise RemoteError(f"run root {uri} needs a prefix below the bucket, e.g. s3://{bucket}/runs/<name>")
    return bucket, prefix + "/"


def _listing(client: Any, bucket: str, prefix: str) -> dict[str, tuple[str, int]]:
    """``{relative key: (etag without quotes, size)}`` of every object under ``prefix``."""
    out: dict[str, tuple[str, int]] = {}
    with _s3_errors(client, bucket, prefix):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(prefix):]] = (str(obj["ETag"]).strip('"'), int(obj["Size"]))
    return out


def _md5(path: Path) -> str:
    return _digests(path)[1].hex()


def _local_files(root: Path) -> list[str]:
    files = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and not p.is_symlink() and not any(part.startswith(".") for part in rel.parts):
            files.append(rel.as_posix())
    return sorted(files)


def _upload_order(rel: str) -> tuple[int, str]:
    for i, last in enumerate(LAST):
        if rel.startswith(last):
            return 1 + i, rel
    return 0, rel


def pull_root(uri: str, local: Path, *, client: Any = None,
              progress: Callable[[str], None] | None = None) -> SyncResult:
    """Make ``local`` hold every object of the run root ``uri`` (downloading only what is missing or differs)."""
    client = client or s3_client()
    bucket, prefix = _prefix(uri)
    local.mkdir(parents=True, exist_ok=True)
    done = skipped = size = 0
    for rel, (etag, nbytes) in sorted(_listing(client, bucket, prefix).items()):
        if not rel or rel.endswith("/") or any(part in ("", ".", "..") for part in rel.split("/")):
            raise RemoteError(f"object {prefix}{rel} in {uri} has an unsafe key: remove it from the bucket")
        dest = local / rel
        if dest.is_file() and dest.stat().st_size == nbytes and ("-" in etag or _md5(dest) == etag):
            skipped += 1
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        try:
            with _s3_errors(client, bucket, prefix + rel):
                client.download_file(bucket, prefix + rel, tmp)
            if "-" not in etag and _md5(Path(tmp)) != etag:
                raise RemoteError(f"s3://{bucket}/{prefix}{rel} changed or was corrupted in transit (MD5 differs "
                                  "from its ETag): retry the step")
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)
        done += 1
        size += nbytes
        if progress:
            progress(rel)
    return SyncResult(done, skipped, size)


def push_root(local: Path, uri: str, *, client: Any = None,
              progress: Callable[[str], None] | None = None) -> SyncResult:
    """Upload the files of ``local`` that the run root ``uri`` lacks or holds differently; markers last."""
    client = client or s3_client()
    bucket, prefix = _prefix(uri)
    remote = _listing(client, bucket, prefix)
    done = skipped = size = 0
    for rel in sorted(_local_files(local), key=_upload_order):
        path = local / rel
        sha, md5, nbytes = _digests(path)
        if remote.get(rel, ("", -1))[0] == md5.hex():
            skipped += 1
            continue
        with open(path, "rb") as body:
            _put(client, bucket, prefix + rel, body, size=nbytes, md5=md5, sha256=bytes.fromhex(sha))
        done += 1
        size += nbytes
        if progress:
            progress(rel)
    return SyncResult(done, skipped, size)
