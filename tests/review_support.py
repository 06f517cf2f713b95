"""Test support for the review web app: a prepared registry, a real server process, and a small HTTP client.

The registry is a copy of the session's tiny run (real MLflow on SQLite, real artifacts); the server is the real
``defectops review`` command in its own process group; the client speaks HTTP over a socket (``http.client``) and
keeps cookies itself, so the tests see exactly the status codes and ``Set-Cookie`` headers a browser would.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import numpy as np
from health import http_ok, wait_until_ready
from tiny import TinyRun

PASSWORDS = {"eng": "engineer-pass-1", "quinn": "quality-pass-1", "ada": "admin-pass-123", "eve": "eve-pass-1234"}
ROLES = {"eng": "ml-engineer", "quinn": "quality-lead", "ada": "admin", "eve": "quality-lead"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _improved(metrics: dict[str, Any]) -> dict[str, Any]:
    """The same test set with a better classifier: half of each class's misses become correct."""
    from defectops.evaluation.metrics import classification_metrics

    cm = np.asarray(metrics["confusion"], dtype=int)
    for i in range(len(cm)):
        for j in range(len(cm)):
            if i != j and cm[i, j]:
                moved = (cm[i, j] + 1) // 2
                cm[i, j] -= moved
                cm[i, i] += moved
    y_true = np.repeat(np.arange(len(cm)), cm.sum(1))
    y_pred = np.concatenate([np.repeat(np.arange(len(cm)), row) for row in cm])
    probs = np.eye(len(cm))[y_pred] * 0.9 + 0.1 / len(cm)
    return classification_metrics(y_true, probs, metrics["classes"], metrics["good_class"]).to_dict()


def make_review_registry(tiny_run: TinyRun, home: Path) -> dict:
    """Champion v1 (the tiny run's version, approved) and challenger v2 (a new run with better metrics)."""
    from defectops.evaluation.gates import evaluate_gates
    from defectops.evaluation.metrics import ClassificationMetrics
    from defectops.registry.config import RegistryConfig
    from defectops.registry.governance import approve, record_register
    from defectops.registry.mlflow_registry import client as make_client

    shutil.copy2(Path(tiny_run.home) / "mlflow.db", home / "mlflow.db")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    c, model, cfg = make_client(uri), tiny_run.cfg.registry.model_name, RegistryConfig()
    approve(c, model, "1", actor="lee", role="quality-lead", reason="first champion", cfg=cfg,
            max_regression=0.02, lock_dir=home)
    v1 = c.get_model_version(model, "1")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        c.download_artifacts(v1.run_id, "evidence", str(t))
        metrics = _improved(json.loads(Path(c.download_artifacts(v1.run_id, "metrics.json", str(t))).read_text()))
        (t / "metrics.json").write_text(json.dumps(metrics))
        gates = evaluate_gates(ClassificationMetrics.from_dict(metrics), tiny_run.cfg.gates)
        (t / "evidence" / "gates.json").write_text(json.dumps(gates.to_dict()))
        run = c.create_run(c.get_run(v1.run_id).info.experiment_id, run_name="candidate-2").info.run_id
        for k, v in c.get_run(v1.run_id).data.params.items():
            c.log_param(run, k, v)
        c.log_artifact(run, str(t / "metrics.json"))
        c.log_artifacts(run, str(t / "evidence"), "evidence")
    mv = c.create_model_version(model, v1.source, run_id=run, description="candidate 2")
    v2 = str(mv.version)
    tags = {k: v for k, v in v1.tags.items() if k in ("defectops.dataset_fingerprint", "defectops.git_commit",
                                                       "defectops.config_hash")}
    tags |= {"defectops.gates_passed": "true", "defectops.gates_failed": "none", "defectops.review_status": "pending",
             "defectops.macro_recall": f"{metrics['macro_recall']:.4f}", "defectops.run_id": "candidate-2"}
    for k, v in tags.items():
        c.set_model_version_tag(model, v2, k, v)
    record_register(c, model, v2, actor="eve", role="ml-engineer", lock_dir=home)
    c.set_registered_model_alias(model, cfg.challenger_alias, v2)
    return {"home": home, "uri": uri, "model": model, "champion": "1", "challenger": v2, "metrics": metrics}


@dataclass
class ReviewServer:
    url: str
    home: Path
    users_file: Path
    registry: dict
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)


def add_users(users_file: Path) -> None:
    from defectops.registry.review.auth import add_user

    for name, password in PASSWORDS.items():
        add_user(users_file, name, ROLES[name], password)


def wait_healthy(url: str, proc: subprocess.Popen[bytes] | None, log: Path, timeout: float = 60) -> None:
    wait_until_ready("review server", lambda: http_ok(f"{url}/healthz"),
                     alive=lambda: proc is None or proc.poll() is None, log=log, timeout=timeout)


@contextmanager
def start_review_server(registry: dict, work: Path, *extra_args: str) -> Iterator[ReviewServer]:
    """Run ``defectops review --insecure-cookies`` (plus ``extra_args``) against ``registry`` on a free port."""
    users_file = work / "users.json"
    add_users(users_file)
    port = free_port()
    env = {**os.environ, "DEFECTOPS_HOME": str(registry["home"])}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DEFECTOPS_REVIEW_SECRET", None)
    log = work / "server.log"
    cli = Path(sys.executable).with_name("defectops")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(cli), "review", "--host", "127.0.0.1", "--port", str(port), "--users-file", str(users_file),
             "--tracking-uri", registry["uri"], "--secret-file", str(work / "secret.key"), "--insecure-cookies",
             *extra_args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield ReviewServer(url, registry["home"], users_file, registry, log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread on a free loopback port; yields its URL. Like ``defectops review``,
    uvicorn's own X-Forwarded-For handling is off (the app decides which proxy to believe)."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           proxy_headers=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: str

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def cookies(self) -> list[str]:
        return [v for k, v in self.headers if k.lower() == "set-cookie"]

    def csrf(self) -> str:
        m = re.search(r'name="csrf" value="([^"]+)"', self.body)
        assert m, f"no CSRF token in the page: {self.body[:500]}"
        return m.group(1)


class Client:
    """A cookie-keeping HTTP client that never follows redirects."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, form: dict[str, str] | None = None,
                headers: dict[str, str] | None = None, accept: str = "text/html") -> Reply:
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
        h = {"Accept": accept, **(headers or {})}
        if self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urlencode(form)
            h["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            reply = Reply(r.status, r.getheaders(), r.read().decode("utf-8", errors="replace"))
        finally:
            conn.close()
        for c in reply.cookies():
            name, _, rest = c.partition("=")
            value = rest.split(";", 1)[0]
            if value == "null" or "expires=Thu, 01 Jan 1970" in c:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return reply

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, form: dict[str, str], **kw: Any) -> Reply:
        return self.request("POST", path, form=form, **kw)

    def login(self, name: str, password: str | None = None) -> Reply:
        token = self.get("/login").csrf()
        r = self.post("/login", {"csrf": token, "username": name, "password": password or PASSWORDS[name],
                                 "next": "/"})
        return r
