"""The quality lead's review web app: the queue, a candidate beside the champion, approve/reject, the audit trail.

What: :func:`create_app` builds a FastAPI app with server-rendered Jinja2 pages (no JavaScript). Pages:
``/`` (queue of challengers per registered model, with the champion), ``/models/<m>/versions/<v>`` (gate table,
per-class recall and precision with deltas against the champion, escape and false-call rates, both confusion
matrices, worst misses with Grad-CAM, dataset lineage, training config, and the decision form),
``/models/<m>/history`` (the registry-stored audit trail and whether it verifies), ``/login``; ``/api/queue`` is the
queue as JSON. Decisions call :func:`registry.governance.approve` / :func:`~registry.governance.reject` with the
signed-in user as actor and their role; the web layer adds no rules of its own and maps refusals to HTTP statuses
(400 no reason, 403 not permitted, 404 unknown version, 409 state does not allow it), shown as a banner.

Auth behaviour (consistent, tested): an anonymous ``GET`` of a page by a browser (``Accept: text/html``) is
redirected (303) to ``/login``; every other anonymous request, every ``POST`` included, gets 401. A signed-in user
whose role may not decide gets 403 on a decision. Every form carries a CSRF token bound to the session; a missing or
bad token gets 403. The session cookie is signed, ``HttpOnly``, ``SameSite=Lax`` and ``Secure`` unless the app was
built with ``insecure_cookies`` (plain-http development and tests on loopback only). Responses carry a strict
Content-Security-Policy (no scripts at all; images only from this origin or ``data:``).

Sign-in throttling (:mod:`registry.review.throttle`, limits in ``ReviewSettings.sign_in``): failed sign-ins are
counted per user name and per client address (the socket peer, or the ``X-Forwarded-For`` client of a trusted proxy,
see :meth:`ProxyAuth.client_address`); a locked attempt gets 429 with ``Retry-After`` and "Too many sign-in attempts;
try again in N minutes." without its password being checked, and a wrong password or unknown user gets 401 "Wrong
user name or password.", the same wording and the same scrypt work either way. Lockouts are logged (user name or
address, and the attempt's user and address) at WARNING for the audit.

Why: the quality lead is not an ML engineer; they need the evidence on one readable page (fits a 1366 px laptop
screen) and one button, while authorisation and the audit trail stay exactly those of the CLI.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from mlflow.tracking import MlflowClient
from starlette.concurrency import run_in_threadpool
from starlette.middleware.sessions import SessionMiddleware

from defectops.registry import governance
from defectops.registry.config import RegistryConfig
from defectops.registry.review import evidence
from defectops.registry.review.auth import CsrfTokens, Identity, ProxyAuth, UserStore, parse_form
from defectops.registry.review.throttle import SignInLimits, SignInThrottle, retry_message

__all__ = ["ReviewSettings", "create_app"]

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
MAX_FORM_BYTES = 16 * 1024
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; "
       "frame-ancestors 'none'")
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"


@dataclass
class ReviewSettings:
    """How the app reaches the registry and authenticates people."""

    tracking_uri: str
    secret: str
    lock_dir: Path
    users_file: Path | None = None
    proxy: ProxyAuth = field(default_factory=ProxyAuth)
    insecure_cookies: bool = False
    models: list[str] = field(default_factory=list)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    max_regression: float = 0.02
    session_max_age_s: int = 8 * 3600
    sign_in: SignInLimits = field(default_factory=SignInLimits)
    clock: Callable[[], float] = time.monotonic  # the sign-in throttle's clock (tests pass a fake one)


class NotSignedIn(Exception):
    """No valid session or trusted proxy identity."""


class Forbidden(Exception):
    """Signed in, but not allowed (role, CSRF)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


_STATUS = {governance.InvalidDecision: 400, governance.NotPermitted: 403, governance.NotFound: 404}


def _status_for(e: governance.GovernanceError) -> int:
    return next((code for cls, code in _STATUS.items() if isinstance(e, cls)), 409)


def _fmt_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _signed(x: float | None, digits: int = 3) -> str:
    return "" if x is None else f"{x:+.{digits}f}"


# One function on purpose (the app factory: every route is a closure over its settings).
def create_app(settings: ReviewSettings) -> FastAPI:  # noqa: C901
    """The review app for the registry at ``settings.tracking_uri``."""
    from defectops.registry.mlflow_registry import client as make_client

    client: MlflowClient = make_client(settings.tracking_uri)
    users = UserStore(settings.users_file)
    throttle = SignInThrottle(settings.sign_in, settings.clock)
    csrf = CsrfTokens(settings.secret)
    cfg = settings.registry
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters.update(fmt_time=_fmt_time, signed=_signed)

    app = FastAPI(title="DefectOps review", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        if not request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    app.add_middleware(SessionMiddleware, secret_key=settings.secret, session_cookie="defectops_review",
                       max_age=settings.session_max_age_s, same_site="lax", https_only=not settings.insecure_cookies)

    # ------------------------------------------------------------------------------------------- identity
    def identity(request: Request) -> Identity | None:
        proxied = settings.proxy.identity(request.client.host if request.client else None, request.headers)
        if proxied is not None:
            return proxied
        name = request.session.get("user")
        return users.get(name) if isinstance(name, str) else None

    def require_user(request: Request) -> Identity:
        who = identity(request)
        if who is None:
            raise NotSignedIn()
        return who

    def page(request: Request, name: str, ctx: dict[str, Any], status_code: int = 200) -> Response:
        who = identity(request)
        flash = request.session.pop("flash", None)
        return templates.TemplateResponse(request, name, {
            "user": who, "csrf": csrf.issue(request.session), "flash": flash, "error": None, **ctx},
            status_code=status_code)

    async def form(request: Request, *fields: str) -> dict[str, str]:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise Forbidden("form too large")
        return parse_form(body, ("csrf", *fields))

    def check_csrf(request: Request, data: dict[str, str]) -> None:
        if not csrf.valid(request.session, data.get("csrf")):
            raise Forbidden("the form's security token is missing or stale: reload the page and try again")

    @app.exception_handler(NotSignedIn)
    async def not_signed_in(request: Request, _e: NotSignedIn) -> Response:
        if request.method == "GET" and "text/html" in request.headers.get("accept", "") \
                and not request.url.path.startswith("/api/"):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='/')}", status_code=303)
        return JSONResponse({"detail": "sign in first (POST /login)"}, status_code=401)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, e: Forbidden) -> Response:
        if "text/html" in request.headers.get("accept", ""):
            return page(request, "error.html", {"title": "Not allowed", "message": e.message}, 403)
        return JSONResponse({"detail": e.message}, status_code=403)

    @app.exception_handler(governance.NotFound)
    async def not_found(request: Request, e: governance.NotFound) -> Response:  # routes check sign-in first
        return page(request, "error.html", {"title": "Not found", "message": str(e)}, 404)

    # ------------------------------------------------------------------------------------------- routes
    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok"

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/") -> Response:
        return page(request, "login.html", {"next": next, "login_error": None})

    @app.post("/login")
    async def login(request: Request) -> Response:
        data = await form(request, "username", "password", "next")
        check_csrf(request, data)
        target = data["next"] if data["next"].startswith("/") and not data["next"].startswith("//") else "/"
        name = data["username"]
        address = settings.proxy.client_address(request.client.host if request.client else None,
                                                ",".join(request.headers.getlist("x-forwarded-for")) or None)
        attempt = throttle.admit(name, address)
        if attempt.refused:  # the same answer whoever the user is, and no password check
            log.info("sign-in refused (locked) for %r from %s", name[:64], address)
            response = page(request, "login.html", {"next": target, "login_error": retry_message(
                attempt.retry_after_s)}, 429)
            response.headers["Retry-After"] = str(math.ceil(attempt.retry_after_s))
            return response
        who = await run_in_threadpool(users.authenticate, name, data["password"])
        if who is None:
            log.warning("failed sign-in for %r from %s", name[:64], address)
            for lock in attempt.lockouts:
                log.warning("sign-in lockout: %s %r locked for %d s after %d failed attempts (user %r from %s)",
                            lock.kind, lock.key[:64], lock.seconds, lock.failures, name[:64], address)
            return page(request, "login.html", {"next": target, "login_error": "Wrong user name or password."},
                        401)
        throttle.succeeded(attempt)
        request.session.clear()  # a fresh session (and CSRF nonce) on every sign-in
        request.session["user"] = who.name
        return RedirectResponse(target, status_code=303)

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        require_user(request)
        check_csrf(request, await form(request))
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    @app.get("/", response_class=HTMLResponse)
    def queue_page(request: Request) -> Response:
        require_user(request)
        rows = evidence.queue_view(client, evidence.model_names(client, settings.models), cfg)
        return page(request, "queue.html", {"models": rows})

    @app.get("/api/queue")
    def queue_api(request: Request) -> Any:
        require_user(request)
        return evidence.queue_view(client, evidence.model_names(client, settings.models), cfg)

    def candidate(request: Request, model: str, version: str, status_code: int = 200,
                  error: str | None = None, reason: str = "") -> Response:
        view = evidence.candidate_view(client, model, version, cfg)
        return page(request, "candidate.html", {"v": view, "error": error, "reason": reason}, status_code)

    @app.get("/models/{model}/versions/{version}", response_class=HTMLResponse)
    def candidate_page(request: Request, model: str, version: str) -> Response:
        require_user(request)
        return candidate(request, model, version)

    @app.get("/models/{model}/versions/{version}/report", response_class=HTMLResponse)
    def report(request: Request, model: str, version: str) -> Response:
        require_user(request)
        html = evidence.report_html(client, model, version)
        if html is None:
            raise governance.NotFound(f"version {version} of {model!r} has no evidence/report.html")
        return HTMLResponse(html, headers={"Content-Security-Policy": REPORT_CSP})

    @app.post("/models/{model}/versions/{version}/decision")
    async def decide(request: Request, model: str, version: str) -> Response:
        who = require_user(request)
        data = await form(request, "action", "reason")
        check_csrf(request, data)
        if who.role not in governance.DECIDER_ROLES:
            raise Forbidden(f"your role ({who.role}) may look at candidates but not decide; a "
                            f"{' or '.join(governance.DECIDER_ROLES)} decides")
        action = data["action"]
        if action not in ("approve", "reject"):
            return await run_in_threadpool(candidate, request, model, version, 400, "choose approve or reject",
                                           data["reason"])
        kwargs: dict[str, Any] = {"actor": who.name, "role": who.role, "reason": data["reason"], "cfg": cfg,
                                  "lock_dir": settings.lock_dir, "identity": f"review-{who.via}"}
        if action == "approve":
            kwargs["max_regression"] = settings.max_regression
        try:
            rec = await run_in_threadpool(getattr(governance, action), client, model, version, **kwargs)
        except governance.GovernanceError as e:
            return await run_in_threadpool(candidate, request, model, version, _status_for(e), str(e),
                                           data["reason"])
        log.info("%s %s v%s by %s (%s): audit #%s", action, model, version, who.name, who.role, rec.seq)
        text = (f"Approved version {rec.version}: it is now the champion (was {rec.previous_champion or 'none'})."
                if action == "approve" else f"Rejected version {rec.version}.")
        request.session["flash"] = {"kind": "ok", "text": f"{text} Audit record #{rec.seq}."}
        return RedirectResponse(f"/models/{quote(model)}/versions/{quote(version)}", status_code=303)

    @app.get("/models/{model}/history", response_class=HTMLResponse)
    def history_page(request: Request, model: str) -> Response:
        require_user(request)
        return page(request, "history.html", {"h": evidence.history_view(client, model, settings.lock_dir)})

    return app
