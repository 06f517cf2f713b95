"""A minimal Argo Server REST client (urllib, no Kubernetes client): submit a workflow from a template, read
workflows. Settings come from ``ARGO_SERVER``, ``ARGO_TOKEN``, ``ARGO_SECURE``, ``ARGO_INSECURE_SKIP_VERIFY`` and
``ARGO_CA_BUNDLE`` (:meth:`ArgoClient.from_env`); every failure is an :class:`ArgoError` with a one-line message.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any


class ArgoError(RuntimeError):
    """An Argo Server request failed; the message is one line."""


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


class ArgoClient:
    """A minimal Argo Server REST client (urllib): JSON in, JSON out, every failure an :class:`ArgoError`."""

    def __init__(self, server: str, token: str | None = None, *, insecure: bool = False, ca_bundle: str | None = None,
                 timeout: float = 30.0, secure_default: bool = True) -> None:
        server = server.strip().rstrip("/")
        if "://" not in server:
            server = f"{'https' if secure_default else 'http'}://{server}"
        parts = urllib.parse.urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"ARGO_SERVER {server!r} is not an http(s) URL or host:port")
        self.base = server
        self.token = token.strip() if token and token.strip() else None
        self.timeout = timeout
        self.context: ssl.SSLContext | None = None
        if parts.scheme == "https":
            if insecure:
                self.context = ssl._create_unverified_context()
            else:
                if ca_bundle and not Path(ca_bundle).is_file():
                    raise ValueError(f"ARGO_CA_BUNDLE {ca_bundle} is not a file")
                self.context = ssl.create_default_context(cafile=ca_bundle or None)

    @classmethod
    def from_env(cls, *, insecure: bool = False) -> ArgoClient:
        server = os.environ.get("ARGO_SERVER", "").strip()
        if not server:
            raise ValueError("ARGO_SERVER is not set: export ARGO_SERVER=https://<argo-server host>:2746 "
                             "(and ARGO_TOKEN), or use --dry-run")
        return cls(server, os.environ.get("ARGO_TOKEN"),
                   insecure=insecure or _truthy(os.environ.get("ARGO_INSECURE_SKIP_VERIFY")),
                   ca_bundle=os.environ.get("ARGO_CA_BUNDLE") or None,
                   secure_default=os.environ.get("ARGO_SECURE", "true").strip().lower() not in ("false", "0", "no"))

    @property
    def plain_http_with_token(self) -> bool:
        host = urllib.parse.urlsplit(self.base).hostname or ""
        return bool(self.token) and self.base.startswith("http://") and host not in ("127.0.0.1", "localhost", "::1")

    def ui_link(self, namespace: str, name: str) -> str:
        return f"{self.base}/workflows/{urllib.parse.quote(namespace)}/{urllib.parse.quote(name)}"

    def request(self, method: str, path: str, body: Any = None, *, what: str) -> dict[str, Any]:
        """``what`` says what was attempted ("create workflows in namespace x") for the error messages."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = self.token if self.token.lower().startswith("bearer ") \
                else f"Bearer {self.token}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.context) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise ArgoError(self._http_message(e.code, _server_message(e), what)) from None
        except urllib.error.URLError as e:
            raise ArgoError(self._network_message(e.reason)) from None
        except TimeoutError as e:
            raise ArgoError(self._network_message(e)) from None
        except OSError as e:
            raise ArgoError(self._network_message(e)) from None
        try:
            out = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            raise ArgoError(f"Argo Server {self.base} answered {method} {path} with something that is not JSON: "
                            f"is ARGO_SERVER the Argo Server (not its UI behind a login page)?") from None
        return out if isinstance(out, dict) else {"items": out}

    def _http_message(self, code: int, detail: str, what: str) -> str:
        tail = f": {detail}" if detail else ""
        if code == 401:
            return (f"Argo Server {self.base} rejected the credentials (401 Unauthorized){tail}: set ARGO_TOKEN to a "
                    f"valid token (see docs/kubernetes.md, 'Tokens')")
        if code == 403:
            return (f"Argo Server {self.base} refused to {what} (403 Forbidden){tail}: the token's account lacks "
                    f"the RBAC (see docs/kubernetes.md, 'Tokens')")
        if code == 404:
            return f"not found (404) trying to {what}{tail}"
        if code == 409:
            return f"conflict (409) trying to {what}{tail}"
        return f"Argo Server {self.base} failed to {what} ({code}){tail}"

    def _network_message(self, reason: Any) -> str:
        if isinstance(reason, ssl.SSLCertVerificationError):
            return (f"TLS verification of Argo Server {self.base} failed ({reason.verify_message or reason}): set "
                    f"ARGO_CA_BUNDLE to its CA certificate, or --insecure for a development server")
        if isinstance(reason, ssl.SSLError):
            return f"TLS with Argo Server {self.base} failed ({reason.reason or reason}): is it https?"
        if isinstance(reason, ConnectionRefusedError):
            return (f"cannot reach Argo Server at {self.base}: connection refused (check ARGO_SERVER; for a cluster "
                    f"without ingress: kubectl -n argo port-forward svc/argo-workflows-server 2746:2746)")
        if isinstance(reason, TimeoutError):
            return f"Argo Server {self.base} did not answer within {self.timeout:.0f} s"
        if isinstance(reason, socket.gaierror):
            return f"cannot reach Argo Server at {self.base}: unknown host"
        text = " ".join(str(getattr(reason, "strerror", None) or reason).split())
        return f"cannot reach Argo Server at {self.base}: {text}"


def _server_message(e: urllib.error.HTTPError) -> str:
    """The server's own one-line reason (grpc-gateway JSON ``{"code", "message"}``), never the whole body."""
    try:
        raw = e.read(64 * 1024)
    except OSError:
        raw = b""
    msg = ""
    try:
        body = json.loads(raw or b"{}")
        if isinstance(body, dict):
            msg = str(body.get("message") or body.get("error") or "")
    except (json.JSONDecodeError, UnicodeDecodeError):
        msg = ""
    msg = " ".join(msg.split())
    return msg[:300] + ("..." if len(msg) > 300 else "")
