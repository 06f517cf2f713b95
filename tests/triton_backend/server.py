"""A real Triton Inference Server for integration tests: the ``tritonserver`` binary of the ``nvidia-pytriton`` wheel.

The server side lives in its own venv, ``.venv-triton`` (``make .venv-triton``, a prerequisite of ``make test``;
pins in ``tests/triton_backend/requirements.txt``), because its python backend needs numpy<2: numpy 2 silently
corrupts tensors there. ``$DEFECTOPS_TRITON_VENV`` points elsewhere.

The wheel ships the python backend only. The backend directory built here holds it (``python/``: the backend
library, its utilities and the Python 3.11 stub) and, under ``onnxruntime/``, ``tests/triton_backend/onnxruntime/
model.py``: a Python-based backend that STANDS IN FOR Triton's C++ onnxruntime backend in these CPU tests only, so
the repository DefectOps publishes (``platform: "onnxruntime_onnx"``) loads unchanged. Production uses Triton's real
onnxruntime backend.

The server runs in a process group of its own on free loopback ports and is killed with its group on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from health import http_ok, wait_until_ready
from s3server import free_ports

REPO = Path(__file__).resolve().parents[2]
STANDIN = Path(__file__).resolve().parent / "onnxruntime" / "model.py"


def triton_venv() -> Path:
    return Path(os.environ.get("DEFECTOPS_TRITON_VENV") or REPO / ".venv-triton")


@dataclass
class TritonServer:
    """A running ``tritonserver``: ``http_url``, ``grpc_url``, ``metrics_url`` (all on 127.0.0.1)."""

    repository: str
    workdir: Path
    ports: dict[str, int]
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    @property
    def log(self) -> Path:
        return self.workdir / "tritonserver.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            return r.read().decode()

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None


def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise RuntimeError(f"{venv} is not a virtual environment: run `make .venv-triton`")
    return found[0]


def backend_dir(venv: Path, dest: Path) -> Path:
    """``dest`` with ``python/`` (the wheel's python backend) and ``onnxruntime/model.py`` (the test stand-in)."""
    triton = _site_packages(venv) / "pytriton" / "tritonserver"
    (dest / "python").mkdir(parents=True, exist_ok=True)
    for src in (triton / "backends" / "python" / "libtriton_python.so",
                triton / "backends" / "python" / "triton_python_backend_utils.py",
                triton / "python_backend_stubs" / "3.11" / "triton_python_backend_stub"):
        if not src.is_file():
            raise RuntimeError(f"{src} is missing: is nvidia-pytriton==0.7.0 installed in {venv}?")
        shutil.copy2(src, dest / "python" / src.name)  # copy2 keeps the stub executable
    (dest / "onnxruntime").mkdir(exist_ok=True)
    shutil.copy2(STANDIN, dest / "onnxruntime" / "model.py")
    return dest


@contextlib.contextmanager
def triton_server(repository: Path | str, workdir: Path, *, timeout: float = 60.0, extra_args: Sequence[str] = (),
                  env: Mapping[str, str] | None = None, wait_for: str = "ready") -> Iterator[TritonServer]:
    """Run ``tritonserver`` on ``repository`` (a folder or an ``s3://`` URL) until the block ends.

    Yields once the server is ready (every model loaded), or live with ``wait_for="live"`` (for a repository with a
    model that cannot load, started with ``--exit-on-error=false``). ``env``: extra environment (S3 credentials).
    """
    venv = triton_venv()
    binary = _site_packages(venv) / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise RuntimeError(f"tritonserver not found at {binary}: run `make .venv-triton` (nvidia-pytriton==0.7.0 "
                           f"in its own numpy<2 venv) or set DEFECTOPS_TRITON_VENV")
    workdir.mkdir(parents=True, exist_ok=True)
    backends = backend_dir(venv, workdir / "backends")
    # the venv interpreter's own libpython: without it the stub loads the system's (Debian's) and fails
    libdir = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_config_var("
                             "'LIBDIR'))"], capture_output=True, text=True, check=True).stdout.strip()
    run_env = {**os.environ, **(env or {}),
               "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
               "LD_LIBRARY_PATH": os.pathsep.join([libdir, str(_site_packages(venv) / "nvidia_pytriton.libs")]),
               "DEFECTOPS_TRITON_ORT_THREADS": "1"}
    run_env.pop("PYTHONPATH", None)
    run_env.pop("VIRTUAL_ENV", None)
    ports = dict(zip(("http", "grpc", "metrics"), free_ports(3), strict=True))
    repo = str(repository) if str(repository).startswith("s3://") else str(Path(repository).resolve())
    server = TritonServer(repo, workdir, ports)
    cmd = [str(binary), f"--model-repository={server.repository}", f"--backend-directory={backends}",
           "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
           "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]), "--metrics-port",
           str(ports["metrics"]), "--allow-gpu-metrics=false", "--exit-timeout-secs=0", *extra_args]
    with open(server.log, "wb") as log:
        server.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=run_env, cwd=workdir, start_new_session=True)
    try:
        proc = server.proc
        wait_until_ready(f"tritonserver (/v2/health/{wait_for})",
                         lambda: http_ok(f"http://{server.http_url}/v2/health/{wait_for}", timeout=1),
                         alive=lambda: proc.poll() is None, log=server.log, timeout=timeout, interval=0.1)
        yield server
    finally:
        server.stop()
