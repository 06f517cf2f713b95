"""Shared fixtures: a quiet, offline environment, one tiny end-to-end run per test session (``TinyRun``), one server of
each kind (S3, MLflow, review app, Triton), and the automatic ``integration`` marker.

The tree mirrors the packages: ``tests/unit/<package>/`` (fast, no servers, no trained run) and ``tests/integration/``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from health import ServerDidNotStart, http_ok, wait_until_ready

if TYPE_CHECKING:
    from tiny import TinyRun

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

TINY = ["+experiment=tiny"]

# Tests that need one of these (a trained run, a server, real data) are integration tests wherever they live.
INTEGRATION_FIXTURES = frozenset({"tiny_run", "s3", "mlflow_server", "review_registry", "review_server",
                                  "triton_repository", "triton", "deeppcb_root"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``integration`` everything under tests/integration/, every test using an integration fixture and every
    ``slow`` test, so that ``pytest -m "not integration"`` (``make unit``) runs the unit tests alone."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if ("integration" in item.path.parts or fixtures & INTEGRATION_FIXTURES
                or item.get_closest_marker("slow") is not None):
            item.add_marker(pytest.mark.integration)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def deeppcb_root() -> Path:
    """The real DeepPCB ``PCBData`` folder ($DEFECTOPS_DEEPPCB, else ../shared/datasets/deeppcb); skips if absent."""
    base = Path(os.environ.get("DEFECTOPS_DEEPPCB") or REPO.parent / "shared" / "datasets" / "deeppcb")
    for cand in (base / "PCBData", base):
        if (cand / "trainval.txt").is_file():
            return cand
    pytest.skip(f"real DeepPCB not found at {base}: set DEFECTOPS_DEEPPCB to the DeepPCB (or its PCBData) folder")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """Run the whole pipeline once on the tiny config in a fresh home; tests read what it left behind."""
    from tiny import TinyRun

    from defectops.pipelines.config import load_config
    from defectops.pipelines.runners.local import run_pipeline

    home = tmp_path_factory.mktemp("home")
    cfg = load_config(TINY)
    ctx, outcomes = run_pipeline(cfg, home=home)
    return TinyRun(home=home, cfg=cfg, ctx=ctx, outcomes=list(outcomes), root=ctx.root)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("DEFECTOPS_HOME", str(h))
    return h


# --- S3: a real SeaweedFS server for tests of training.remote (tests/s3server.py) ---------------------------------
from collections.abc import Iterator  # noqa: E402 - kept with the fixture it serves

from s3server import SeaweedS3, find_weed, seaweed_s3  # noqa: E402


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real SeaweedFS S3 server (signatures and checksums checked) shared by the session; see tests/s3server.py."""
    try:
        find_weed()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    with seaweed_s3(tmp_path_factory.mktemp("s3")) as server:
        yield server


# --- MLflow: a real tracking server (SQLite backend, local artifact store) shared by the session --------------------
@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on a free loopback port; yields its URL. Killed with its process group at the end."""
    import signal
    import socket
    import subprocess
    import sys

    work = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
         "--artifacts-destination", str(work / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_ready("mlflow server", lambda: http_ok(f"{url}/health"), alive=lambda: proc.poll() is None,
                             log=work / "server.log", timeout=90, interval=0.5)
        except ServerDidNotStart as e:
            pytest.fail(str(e), pytrace=False)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


# --- Review web app: a registry with a champion and a challenger, and one real `defectops review` server ----------
from review_support import ReviewServer, make_review_registry, start_review_server  # noqa: E402


@pytest.fixture(scope="session")
def review_registry(tiny_run: TinyRun, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A copy of the tiny run's registry where version 1 is the champion (approved by ``lee``) and version 2, on a
    run with better metrics and the same evidence layout, is the pending ``challenger`` registered by ``eve``."""
    return make_review_registry(tiny_run, tmp_path_factory.mktemp("review-home"))


@pytest.fixture(scope="session")
def review_server(review_registry: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReviewServer]:
    """``defectops review --insecure-cookies`` on a free loopback port, shared by the session's review tests."""
    with start_review_server(review_registry, tmp_path_factory.mktemp("review-server")) as server:
        yield server


# --- Triton: the real tritonserver (nvidia-pytriton wheel, CPU) serving the tiny run's model (tests/triton_backend/) --
from triton_backend.server import TritonServer, triton_server  # noqa: E402

# Dynamic batching window of the served model: long enough that requests fired together are batched on 2 busy cores
TRITON_QUEUE_DELAY_US = 20000


@pytest.fixture(scope="session")
def triton_repository(tiny_run: TinyRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run's model (``defectops-aoi``) published with ``defectops serve publish --model <run root> --to
    <folder>``."""
    from typer.testing import CliRunner

    from defectops.pipelines.cli import app

    repo = tmp_path_factory.mktemp("triton-repo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEFECTOPS_HOME", str(tiny_run.home))
        r = CliRunner().invoke(app, ["serve", "publish", "--model", str(tiny_run.root), "--to", str(repo),
                                     "--max-queue-delay-us", str(TRITON_QUEUE_DELAY_US)])
    if r.exit_code != 0:
        pytest.fail(f"defectops serve publish failed ({r.exit_code}): {r.output}", pytrace=False)
    return repo


@pytest.fixture(scope="session")
def triton(triton_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """``tritonserver`` on ``triton_repository`` (free loopback ports, own process group, killed at the end).

    Its ``onnxruntime`` backend is the Python stand-in of tests/triton_backend/onnxruntime/model.py (the wheel has
    no C++ onnxruntime backend): the repository is the production one, the backend is test support only. A server
    that cannot start fails the tests that need it, with its log, rather than skipping them.
    """
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(triton_server(triton_repository, tmp_path_factory.mktemp("triton")))
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            pytest.fail(f"the Triton test server did not start: {e}", pytrace=False)
        yield server
