"""Snapshot push/pull against a real S3 server (SeaweedFS, which checks signatures and checksums): round trip,
dedup and idempotence, caching, tamper detection, crash-and-resume of both directions, and one-line errors.

No S3 mocks: every test talks to ``weed`` over HTTP. The crash tests run their own server so they can SIGKILL it
mid-transfer and restart it on the same data directory and ports.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from s3server import SeaweedS3, free_ports, seaweed_s3

from defectops.training.remote import (
    RemoteError,
    TransferResult,
    object_key,
    parse_s3_uri,
    pull_snapshot,
    push_snapshot,
    remote_fingerprint,
    s3_client,
    snapshot_key,
)
from defectops.training.snapshot import Snapshot, load_snapshot, write_snapshot

BUCKET = "snapshots"
ODD_NAME = "odd names/board (copy) ünïcødé 基板 #1+%20.png"


# ------------------------------------------------------------------------------------------------------- helpers


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _png(seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _write(root: Path, rel: str, data: bytes) -> str:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)
    return _sha(data)


def small_snapshot(root: Path) -> Snapshot:
    """20 PNGs: 16 single images (one with an awkward name, one without a manifest sha256), 2 board pairs, and a
    duplicate of the first image under another path (one object for both)."""
    samples: list[dict[str, Any]] = []
    for i in range(15):
        rel = f"images/img_{i:02d}.png"
        samples.append({"path": rel, "sha256": _write(root, rel, _png(i)), "label": ["short", "open"][i % 2],
                        "split": "train"})
    samples.append({"path": ODD_NAME, "sha256": _write(root, ODD_NAME, _png(100)), "label": "short", "split": "val"})
    _write(root, "images/no_hash.png", _png(101))
    samples.append({"path": "images/no_hash.png", "label": "open", "split": "test"})  # pull finds it via files map
    samples.append({"path": "images/dup.png", "sha256": _write(root, "images/dup.png", _png(0)), "label": "short",
                    "split": "train"})
    for j in range(2):
        t, m = f"pairs/{j}_test.png", f"pairs/{j}_temp.png"
        samples.append({"path": t, "sha256": _write(root, t, _png(200 + j)), "template": m,
                        "template_sha256": _write(root, m, _png(300 + j)), "label": "board", "split": "val",
                        "boxes": [[1, 2, 5, 6, "short"]]})
    return write_snapshot(root, samples, ["short", "open"])


def big_snapshot(root: Path, n: int = 200, size: int = 50_000) -> Snapshot:
    rng = np.random.default_rng(7)
    samples = [{"path": f"blobs/{i:03d}.bin", "sha256": _write(root, f"blobs/{i:03d}.bin", rng.bytes(size)),
                "label": "short", "split": "train"} for i in range(n)]
    return write_snapshot(root, samples, ["short"])


def files_of(snap: Snapshot) -> dict[str, bytes]:
    rels = {s["path"] for s in snap.samples} | {s["template"] for s in snap.samples if "template" in s}
    return {rel: snap.file(rel).read_bytes() for rel in sorted(rels)}


def client_for(server: SeaweedS3, **kw: Any) -> Any:
    return s3_client(server.endpoint, access_key=server.access_key, secret_key=server.secret_key, **kw)


def keys(client: Any, prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


def counter() -> tuple[list[int], Callable[[int], None]]:
    calls: list[int] = []
    return calls, calls.append


@pytest.fixture(scope="module")
def client(s3: SeaweedS3) -> Any:
    c = client_for(s3)
    if BUCKET not in {b["Name"] for b in c.list_buckets()["Buckets"]}:
        c.create_bucket(Bucket=BUCKET)
    return c


@pytest.fixture
def base(client: Any, request: pytest.FixtureRequest) -> str:
    """A fresh prefix per test in the shared bucket."""
    return f"s3://{BUCKET}/{re.sub(r'[^A-Za-z0-9_-]', '_', request.node.name)}-{time.time_ns()}"


@pytest.fixture
def crashable(tmp_path: Path) -> Iterator[SeaweedS3]:
    """A server of this test's own, to be SIGKILLed and restarted."""
    with seaweed_s3(tmp_path / "s3") as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server


# ---------------------------------------------------------------------------------------------------- pure parts


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    for bad in ("bucket/a", "http://bucket/a", "s3:///a", "s3://Bad_Bucket/a", "s3://bucket//a"):
        with pytest.raises(ValueError, match="s3://bucket/prefix|empty path segment"):
            parse_s3_uri(bad)


def test_bad_pinned_uri_and_bad_manifest_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a snapshot fingerprint"):
        pull_snapshot("s3://bucket/p@abc", tmp_path / "d", client=object())
    _write(tmp_path / "s", "a.png", b"x")
    write_snapshot(tmp_path / "s", [{"path": "../a.png", "label": "x", "split": "train"}], ["x"])
    with pytest.raises(ValueError, match=r"'\.\./a\.png' escapes the snapshot folder"):
        push_snapshot(tmp_path / "s", "s3://bucket/p", client=object())


# ------------------------------------------------------------------------------------------------------- transfer


def test_push_pull_round_trip(client: Any, base: str, tmp_path: Path) -> None:
    snap = small_snapshot(tmp_path / "src")
    calls, progress = counter()
    res = push_snapshot(snap.dir, base, client=client, progress=progress)
    originals = files_of(snap)
    assert res == TransferResult(snap.fingerprint, uploaded=len(originals) - 1, skipped=1,
                                 bytes=sum(len(b) for b in set(originals.values())), uri=f"{base}@{snap.fingerprint}")
    assert len(calls) == len(originals)

    _, prefix = parse_s3_uri(base)
    stored = keys(client, prefix)
    for data in originals.values():
        assert stored[object_key(prefix, _sha(data))] == len(data)
    assert {k for k in stored if "/snapshots/" in k} == {
        snapshot_key(prefix, snap.fingerprint, n) for n in ("manifest.jsonl", "classes.json", "snapshot.json")
    } | {f"{prefix}/snapshots/latest"}
    latest = client.get_object(Bucket=BUCKET, Key=f"{prefix}/snapshots/latest")["Body"].read()
    assert latest == snap.fingerprint.encode()
    assert remote_fingerprint(base, client=client) == snap.fingerprint
    assert remote_fingerprint(res.uri, client=client) == snap.fingerprint
    assert remote_fingerprint(f"{base}@{'0' * 64}", client=client) is None
    assert remote_fingerprint(f"{base}-empty", client=client) is None

    dest = tmp_path / "pulled"
    got = pull_snapshot(base, dest, client=client)
    assert got.fingerprint == snap.fingerprint
    assert got.dir == dest
    assert got.files_root == dest.resolve()
    assert files_of(got) == originals
    assert (dest / ODD_NAME).read_bytes() == originals[ODD_NAME]
    assert got.samples == load_snapshot(snap.dir).samples
    meta = json.loads((dest / "snapshot.json").read_text())
    assert meta["files_root"] == "."
    assert meta["files"]["images/no_hash.png"] == _sha(originals["images/no_hash.png"])
    assert not dest.with_name("pulled.partial").exists()


def test_repush_uploads_nothing(client: Any, base: str, tmp_path: Path) -> None:
    snap = small_snapshot(tmp_path / "src")
    first = push_snapshot(snap.dir, base, client=client)
    again = push_snapshot(snap.dir, base, client=client)
    assert (again.uploaded, again.bytes, again.skipped) == (0, 0, first.uploaded + first.skipped)

    # a second snapshot sharing most files uploads only what is new (dedup across snapshots)
    extra = {"path": "images/new.png", "sha256": _write(snap.dir, "images/new.png", _png(999)), "label": "open",
             "split": "train"}
    snap2 = write_snapshot(snap.dir, [*snap.samples, extra], list(snap.classes))
    third = push_snapshot(snap2.dir, base, client=client)
    assert third.fingerprint != snap.fingerprint
    assert (third.uploaded, third.skipped) == (1, first.uploaded + first.skipped)
    assert remote_fingerprint(base, client=client) == snap2.fingerprint
    assert remote_fingerprint(first.uri, client=client) == snap.fingerprint


def test_pull_into_complete_dest_does_no_transfer(s3: SeaweedS3, client: Any, base: str, tmp_path: Path) -> None:
    snap = small_snapshot(tmp_path / "src")
    res = push_snapshot(snap.dir, base, client=client)
    dest = tmp_path / "dest"
    pull_snapshot(base, dest, client=client)
    mtimes = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}

    dead = s3_client(f"http://127.0.0.1:{free_ports(1)[0]}", access_key="x", secret_key="y", retries=0)
    assert pull_snapshot(res.uri, dest, client=dead).fingerprint == snap.fingerprint  # pinned: not one request
    calls, progress = counter()
    assert pull_snapshot(base, dest, client=client, progress=progress).fingerprint == snap.fingerprint
    assert calls == []  # latest: only the pointer is read
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == mtimes

    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("not a snapshot")
    with pytest.raises(FileExistsError, match="already exists"):
        pull_snapshot(res.uri, other, client=client)


def test_in_place_snapshot_pulls_self_contained(client: Any, base: str, tmp_path: Path) -> None:
    data = tmp_path / "dataset"
    samples = [{"path": f"raw/{i}.png", "sha256": _write(data, f"raw/{i}.png", _png(i)), "label": "short",
                "split": "train"} for i in range(3)]
    snap = write_snapshot(tmp_path / "snap", samples, ["short"], files_root=data)  # files read in place
    assert json.loads((snap.dir / "snapshot.json").read_text())["files_root"] == str(data.resolve())
    push_snapshot(snap.dir, base, client=client)
    got = pull_snapshot(base, tmp_path / "dest", client=client)
    assert got.files_root == (tmp_path / "dest").resolve()
    assert files_of(got) == files_of(snap)


def test_push_replaces_truncated_object(client: Any, base: str, tmp_path: Path) -> None:
    snap = small_snapshot(tmp_path / "src")
    _, prefix = parse_s3_uri(base)
    data = (snap.dir / "images/img_03.png").read_bytes()
    client.put_object(Bucket=BUCKET, Key=object_key(prefix, _sha(data)), Body=data[:10])  # a broken earlier upload
    res = push_snapshot(snap.dir, base, client=client)
    assert client.head_object(Bucket=BUCKET, Key=object_key(prefix, _sha(data)))["ContentLength"] == len(data)
    assert res.uploaded == len(files_of(snap)) - 1  # everything but the duplicate, the truncated object included


def test_tampered_object_fails_pull_and_leaves_no_dest(client: Any, base: str, tmp_path: Path) -> None:
    snap = small_snapshot(tmp_path / "src")
    push_snapshot(snap.dir, base, client=client)
    _, prefix = parse_s3_uri(base)
    victim = object_key(prefix, _sha((snap.dir / ODD_NAME).read_bytes()))
    client.put_object(Bucket=BUCKET, Key=victim, Body=_png(12345))

    dest = tmp_path / "dest"
    with pytest.raises(RemoteError, match=rf"{re.escape(ODD_NAME)} is corrupt or tampered.*{re.escape(victim)}"):
        pull_snapshot(base, dest, client=client)
    assert not dest.exists()


def test_push_refuses_file_that_differs_from_manifest(client: Any, base: str, tmp_path: Path) -> None:
    snap = small_snapshot(tmp_path / "src")
    (snap.dir / "pairs/1_temp.png").write_bytes(_png(4242))
    with pytest.raises(ValueError, match=r"pairs/1_temp\.png does not match its sha256"):
        push_snapshot(snap.dir, base, client=client)
    assert remote_fingerprint(f"{base}@{snap.fingerprint}", client=client) is None


# -------------------------------------------------------------------------------------------------------- crashes


def test_server_dies_mid_push_then_push_resumes(crashable: SeaweedS3, tmp_path: Path) -> None:
    snap = big_snapshot(tmp_path / "big")
    base, prefix = f"s3://{BUCKET}/crash", "crash"
    calls: list[int] = []

    def kill_after_40(n: int) -> None:  # progress runs in the caller's thread while workers keep uploading
        calls.append(n)
        if len(calls) == 40:
            crashable.kill()

    with pytest.raises(RemoteError, match="unreachable|dropped"):
        push_snapshot(snap.dir, base, client=client_for(crashable, retries=0), progress=kill_after_40)
    assert 40 <= len(calls) < 200

    crashable.start()
    c = client_for(crashable)
    assert snapshot_key(prefix, snap.fingerprint, "snapshot.json") not in keys(c, prefix)
    assert remote_fingerprint(base, client=c) is None
    sizes = {object_key(prefix, s["sha256"]): snap.file(s["path"]).stat().st_size for s in snap.samples}
    stored = keys(c, prefix)
    present = sum(1 for k, size in sizes.items() if stored.get(k) == size)
    assert present >= 40

    res = push_snapshot(snap.dir, base, client=c)
    # Nothing already there is sent again. An object the killed server was finishing can become listable only after
    # the restart (seen once in CI: 42 skipped where 41 were listed), so the count is a lower bound, not an equality.
    assert res.uploaded + res.skipped == 200 and res.skipped >= present
    stored = keys(c, prefix)
    assert all(stored.get(k) == size for k, size in sizes.items())
    assert remote_fingerprint(base, client=c) == snap.fingerprint


def test_server_dies_mid_pull_then_pull_resumes(crashable: SeaweedS3, tmp_path: Path) -> None:
    snap = big_snapshot(tmp_path / "big")
    base = f"s3://{BUCKET}/crash"
    push_snapshot(snap.dir, base, client=client_for(crashable))
    dest = tmp_path / "dest"
    calls: list[int] = []

    def kill_after_40(n: int) -> None:
        calls.append(n)
        if len(calls) == 40:
            crashable.kill()

    with pytest.raises(RemoteError, match="unreachable|dropped"):
        pull_snapshot(base, dest, client=client_for(crashable, retries=0), progress=kill_after_40)
    assert not dest.exists()
    kept = [p for p in (tmp_path / "dest.partial" / "tree").rglob("*") if p.is_file()]
    assert 40 <= len(kept) < 200

    crashable.start()
    calls2, progress = counter()
    got = pull_snapshot(base, dest, client=client_for(crashable), progress=progress)
    assert len(calls2) == 200
    assert sum(1 for n in calls2 if n > 0) == 200 - len(kept)  # kept files were verified, not fetched again
    assert files_of(got) == files_of(snap)
    assert not (tmp_path / "dest.partial").exists()


# --------------------------------------------------------------------------------------------------------- errors


def test_wrong_credentials(s3: SeaweedS3, client: Any, base: str, tmp_path: Path) -> None:
    snap = small_snapshot(tmp_path / "src")
    bad = s3_client(s3.endpoint, access_key=s3.access_key, secret_key="not-the-secret", retries=0)
    with pytest.raises(RemoteError, match=r"access denied .*check the AWS credentials"):
        push_snapshot(snap.dir, base, client=bad)
    push_snapshot(snap.dir, base, client=client)
    with pytest.raises(RemoteError, match=r"access denied .*check the AWS credentials"):
        pull_snapshot(base, tmp_path / "dest", client=bad)
    assert not (tmp_path / "dest").exists()


def test_no_credentials(s3: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    snap = small_snapshot(tmp_path / "src")
    with pytest.raises(RemoteError, match="no usable AWS credentials .*AWS_ACCESS_KEY_ID"):
        push_snapshot(snap.dir, f"s3://{BUCKET}/x", client=s3_client(s3.endpoint))


def test_missing_bucket(client: Any, tmp_path: Path) -> None:
    snap = small_snapshot(tmp_path / "src")
    with pytest.raises(RemoteError, match="S3 bucket no-such-bucket does not exist .*create it"):
        push_snapshot(snap.dir, "s3://no-such-bucket/p", client=client)
    with pytest.raises(RemoteError, match="S3 bucket no-such-bucket does not exist"):
        pull_snapshot("s3://no-such-bucket/p", tmp_path / "dest", client=client)
    with pytest.raises(RemoteError, match="S3 bucket no-such-bucket does not exist"):
        remote_fingerprint("s3://no-such-bucket/p", client=client)


def test_nothing_pushed_yet(client: Any, base: str, tmp_path: Path) -> None:
    with pytest.raises(RemoteError, match="no snapshot at .*push one first"):
        pull_snapshot(base, tmp_path / "dest", client=client)
    with pytest.raises(RemoteError, match="absent or incomplete"):
        pull_snapshot(f"{base}@{'a' * 64}", tmp_path / "dest", client=client)


def test_unreachable_endpoint_fails_fast(tmp_path: Path) -> None:
    snap = small_snapshot(tmp_path / "src")
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
    dead = s3_client(endpoint, access_key="x", secret_key="y", connect_timeout=1, retries=0)
    start = time.monotonic()
    with pytest.raises(RemoteError, match=rf"S3 endpoint {re.escape(endpoint)} unreachable.*AWS_ENDPOINT_URL"):
        push_snapshot(snap.dir, f"s3://{BUCKET}/p", client=dead)
    with pytest.raises(RemoteError, match="unreachable"):
        pull_snapshot(f"s3://{BUCKET}/p", tmp_path / "dest", client=dead)
    assert time.monotonic() - start < 5


def test_client_from_environment(s3: SeaweedS3, client: Any, base: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    env_client = s3_client()
    assert env_client.meta.endpoint_url == s3.endpoint
    assert env_client.meta.config.s3["addressing_style"] == "path"
    assert env_client.meta.config.signature_version == "s3v4"
    snap = small_snapshot(tmp_path / "src")
    res = push_snapshot(snap.dir, base)  # default client: everything from the environment
    assert remote_fingerprint(base, client=client) == res.fingerprint
    assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint


def test_push_refuses_a_symlink_out_of_the_files_root_before_any_upload(tmp_path: Path) -> None:
    _write(tmp_path / "s", "a.png", b"x")
    (tmp_path / "secret").write_text("root:x:0:0\n")
    try:
        (tmp_path / "s" / "b.png").symlink_to(tmp_path / "secret")
    except OSError:
        pytest.skip("symlinks are not available here")
    write_snapshot(tmp_path / "s", [{"path": "a.png", "label": "x", "split": "train"},
                                    {"path": "b.png", "label": "x", "split": "train"}], ["x"])
    with pytest.raises(ValueError, match=r"'b\.png' escapes the dataset root \(symlink to"):
        push_snapshot(tmp_path / "s", "s3://bucket/p", client=object())  # never reaches the client
