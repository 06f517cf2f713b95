"""Who may approve on a shared registry: a real `mlflow server --app-name basic-auth` on loopback decides who the user
is (their credentials) and what they may do (their permission on the registered model, set by the MLflow admin);
`--as` / `--role` are refused there. On the embedded registry the local user is used and the trail says so."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from health import http_ok, wait_until_ready
from typer.testing import CliRunner

from defectops.registry.identity import DECLARED, Identity, IdentityError, resolve_identity, role_from_permission

MODEL = "line-aoi"
ADMIN_PASSWORD = "admin-password-1234"  # a throwaway server's admin, created for this test
PASSWORDS = {"eng": "engineer-password-5678", "lead": "quality-lead-password-9012"}


@dataclass
class AuthRegistry:
    url: str
    version: str


def _env(user: str, password: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthRegistry]:
    """The server, users `eng` (EDIT on the model: an ML engineer) and `lead` (MANAGE: a quality lead), and a gated
    challenger registered by `eng`."""
    work = tmp_path_factory.mktemp("mlflow-auth")
    (work / "auth.ini").write_text("[mlflow]\ndefault_permission = READ\n"
                                   f"database_uri = sqlite:///{work / 'auth.db'}\nadmin_username = admin\n"
                                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                                   "grant_default_workspace_access = false\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_AUTH_CONFIG_PATH": str(work / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri",
         f"sqlite:///{work / 'mlflow.db'}", "--artifacts-destination", str(work / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready("mlflow server --app-name basic-auth", lambda: http_ok(f"{url}/health"),
                         alive=lambda: proc.poll() is None, log=work / "server.log", timeout=120, interval=0.5)
        yield AuthRegistry(url, _setup(url, work))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def _setup(url: str, work: Path) -> str:
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    with pytest.MonkeyPatch.context() as mp:
        for k, v in _env("admin", ADMIN_PASSWORD).items():
            mp.setenv(k, v)
        auth = get_app_client("basic-auth", tracking_uri=url)
        for user, password in PASSWORDS.items():
            auth.create_user(user, password)
        c = MlflowClient(url)
        exp = c.create_experiment("line-aoi-runs")
        run = c.create_run(exp).info.run_id
        metrics = {"classes": ["false_call", "short"], "good_class": "false_call", "confusion": [[9, 1], [0, 10]]}
        (work / "metrics.json").write_text(json.dumps(metrics))
        c.log_artifact(run, str(work / "metrics.json"))
        c.create_registered_model(MODEL)
        version = str(c.create_model_version(MODEL, f"runs:/{run}/model", run_id=run).version)
        for k, v in {"defectops.gates_passed": "true", "defectops.registered_by": "eng",
                     "defectops.review_status": "pending"}.items():
            c.set_model_version_tag(MODEL, version, k, v)
        c.set_registered_model_alias(MODEL, "challenger", version)
        auth.grant_user_permission("eng", "registered_model", MODEL, "EDIT")
        auth.grant_user_permission("lead", "registered_model", MODEL, "MANAGE")
        audit = c.create_experiment(f"defectops-audit/{MODEL}")  # where the trail is written: leads may write there
        auth.grant_user_permission("lead", "experiment", audit, "EDIT")
    return version


def _approve(url: str, env: dict[str, str], *extra: str, home: Path) -> object:
    from defectops.pipelines.cli import app

    full = {**env, "DEFECTOPS_HOME": str(home)}
    return CliRunner().invoke(app, ["registry", "approve", "1", "--reason", "release for line 3", "--model", MODEL,
                                    "--tracking-uri", url, *extra], env=full)


def test_role_from_the_users_permission_on_the_model() -> None:
    assert role_from_permission("MANAGE", is_admin=False) == "quality-lead"
    assert role_from_permission("EDIT", is_admin=False) == "ml-engineer"
    assert role_from_permission("READ", is_admin=True) == "admin"


def test_the_embedded_registry_uses_the_declared_local_user_and_says_so() -> None:
    who = resolve_identity("sqlite:///x.db", MODEL, declared_user=None, declared_role="quality-lead",
                           env={"DEFECTOPS_USER": "dana"})
    assert who == Identity("dana", "quality-lead", DECLARED)
    with pytest.raises(IdentityError, match="needs your MLflow credentials"):
        resolve_identity("http://127.0.0.1:9", MODEL, declared_user=None, declared_role=None, env={})


def test_an_ml_engineer_cannot_approve_and_a_declared_role_is_refused(auth_registry: AuthRegistry,
                                                                       tmp_path: Path) -> None:
    eng = _env("eng", PASSWORDS["eng"])
    refused = _approve(auth_registry.url, eng, home=tmp_path)
    assert refused.exit_code == 1 and "role 'ml-engineer' may not approve" in refused.output  # type: ignore[attr-defined]
    declared = _approve(auth_registry.url, eng, "--role", "quality-lead", "--as", "lead", home=tmp_path)
    assert declared.exit_code == 2 and "--as/--role are refused" in declared.output  # type: ignore[attr-defined]
    wrong = _approve(auth_registry.url, _env("lead", "not-the-right-password"), home=tmp_path)
    assert wrong.exit_code == 2 and "refused the credentials of 'lead'" in wrong.output  # type: ignore[attr-defined]


def test_a_quality_leads_credentials_approve_and_the_trail_names_them(auth_registry: AuthRegistry,
                                                                      tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from defectops.registry.audit_store import RegistryTrail

    lead = _env("lead", PASSWORDS["lead"])
    ok = _approve(auth_registry.url, lead, home=tmp_path)
    assert ok.exit_code == 0, ok.output  # type: ignore[attr-defined]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in lead.items():
            mp.setenv(k, v)
        c = MlflowClient(auth_registry.url)
        assert c.get_model_version_by_alias(MODEL, "champion").version == auth_registry.version
        check = RegistryTrail(c, MODEL, tmp_path).check()
    assert check.ok, check.problem
    last = check.records[-1]
    assert (last["actor"], last["role"], last["action"], last["identity"]) == (
        "lead", "quality-lead", "approve", "mlflow-basic-auth")
