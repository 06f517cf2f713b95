"""A local AWS API emulator for the Terraform tests: ``moto_server`` on a free loopback port.

Why moto and not SeaweedFS (tests/s3server.py): Terraform's dev environment needs EC2 (VPC, subnets, NAT, flow logs,
launch templates), KMS, IAM (OIDC providers, roles, AWS managed policies), CloudWatch Logs, EKS (cluster, node
groups) and S3 from one endpoint; moto answers all of them. It does not check signatures, so it says nothing about
credentials, and it stores some settings without acting on them (tests/unit/deploy/test_terraform.py says which).

``MOTO_IAM_LOAD_MANAGED_POLICIES=true`` loads AWS's managed policies, so attaching ``AmazonEKSClusterPolicy`` and the
node policies works as on AWS. The server runs in a process group of its own, killed on exit. ``moto_server`` comes
from ``moto[server]`` (test extra) and is looked up next to the running interpreter, then on ``PATH``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from health import http_ok, wait_until_ready

MOTO_PIN = "moto[server]==5.2.5"
ACCESS_KEY = "testing"  # moto accepts any key; these never leave the loopback interface
SECRET_KEY = "testing"
ACCOUNT_ID = "123456789012"  # moto's default account


def find_moto_server() -> str:
    """Path of the ``moto_server`` script; ``RuntimeError`` saying how to install it when there is none."""
    here = Path(sys.executable).parent / "moto_server"
    if here.exists():
        return str(here)
    found = shutil.which("moto_server")
    if found is None:
        raise RuntimeError(f"moto_server not found next to {sys.executable} or on PATH: pip install '{MOTO_PIN}' "
                           "(the test extra) to run the Terraform apply tests")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MotoServer:
    url: str
    log: Path
    region: str

    def env(self) -> dict[str, str]:
        """Environment for AWS clients (Terraform's provider, the AWS CLI, boto3) pointed at this server only."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_S3_USE_PATH_STYLE": "true",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, service: str):  # -> botocore client
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name=self.region,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)


@contextlib.contextmanager
def moto_server(log_dir: Path, region: str = "eu-west-1", timeout: float = 30.0) -> Iterator[MotoServer]:
    """Start ``moto_server`` on 127.0.0.1 and a free port, wait until it answers, yield it; kill its group on exit."""
    exe = find_moto_server()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = log_dir / "moto_server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["MOTO_IAM_LOAD_MANAGED_POLICIES"] = "true"
    with log.open("wb") as out:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        wait_until_ready(f"moto_server on {url}", lambda: http_ok(f"{url}/moto-api/", timeout=1),
                         alive=lambda: proc.poll() is None, log=log, timeout=timeout)
        yield MotoServer(url=url, log=log, region=region)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
