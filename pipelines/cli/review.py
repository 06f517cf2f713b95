"""``defectops review``: serve the quality lead's review web app, and manage its users file.

Why a command of its own: the review page is how a quality lead (not an ML engineer) approves or rejects a
challenger; it must run against the same registry, lock directory and governance rules as ``defectops registry``.
The app itself is :mod:`registry.review.app`; this module only resolves paths and flags and starts uvicorn.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import Annotated

import typer

from defectops.pipelines.cli.common import EXIT_USAGE, console, fail, resolve_tracking_uri

review_app = typer.Typer(
    help="Serve the review web app: candidates beside the champion, approve/reject with a reason, the audit trail.\n\n"
         "Every page needs a signed-in user (users file, see `defectops review add-user`) or, with "
         "--trust-proxy-headers, an identity asserted by a trusted reverse proxy.",
    invoke_without_command=True)

UsersFile = Annotated[Path | None, typer.Option(
    "--users-file", envvar="DEFECTOPS_REVIEW_USERS",
    help="JSON users file (roles and salted password hashes; default: <home>/review/users.json).")]


def _home() -> Path:
    from defectops.pipelines.config import home_dir

    return home_dir()


def _users_file(users_file: Path | None) -> Path:
    return users_file or _home() / "review" / "users.json"


@review_app.callback()
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on (put a TLS-terminating proxy in front for others "
                                           "to reach it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    users_file: UsersFile = None,
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="MLflow registry (default: $MLFLOW_TRACKING_URI, else sqlite:///<home>/mlflow.db).")]
    = None,
    model: Annotated[list[str] | None, typer.Option(
        "--model", help="Registered model to show (repeatable; default: every registered model).")] = None,
    trust_proxy_headers: Annotated[bool, typer.Option(
        "--trust-proxy-headers", help="Accept the user and role from a reverse proxy's headers (see --user-header, "
                                      "--role-header), only from --trusted-proxy addresses.")] = False,
    trusted_proxy: Annotated[list[str] | None, typer.Option(
        "--trusted-proxy", help="Address or CIDR of a trusted proxy (repeatable; default 127.0.0.1 and ::1).")]
    = None,
    user_header: Annotated[str, typer.Option(help="Header carrying the user name.")] = "X-Forwarded-User",
    role_header: Annotated[str, typer.Option(help="Header carrying the role.")] = "X-Forwarded-Role",
    secret_file: Annotated[Path | None, typer.Option(
        help="Session-signing secret ($DEFECTOPS_REVIEW_SECRET wins; default <home>/review/secret.key, created "
             "with mode 0600 if absent).")] = None,
    insecure_cookies: Annotated[bool, typer.Option(
        "--insecure-cookies", help="Development and tests only: send the session cookie without the Secure flag, "
                                   "so sign-in works over plain http (e.g. on 127.0.0.1). Never in production.")]
    = False,
    max_regression: Annotated[float | None, typer.Option(
        help="Allowed drop of macro and per-class recall against the champion (default: gates.max_regression).")]
    = None,
    trust_forwarded_for: Annotated[bool, typer.Option(
        "--trust-forwarded-for", help="Count sign-in attempts per client address taken from X-Forwarded-For on "
                                      "connections from --trusted-proxy addresses (implied by --trust-proxy-headers); "
                                      "without it, behind a proxy, every client counts as the proxy's address.")]
    = False,
    sign_in_user_limit: Annotated[int, typer.Option(
        min=0, help="Failed sign-ins per user name within --sign-in-window before it is locked (0: off).")] = 5,
    sign_in_address_limit: Annotated[int, typer.Option(
        min=0, help="Failed sign-ins per client address within --sign-in-window before it is locked (0: off).")]
    = 20,
    sign_in_window: Annotated[float, typer.Option(
        min=1, help="Seconds over which failed sign-ins are counted.")] = 900,
    sign_in_lockout: Annotated[float, typer.Option(
        min=1, help="Seconds of the first lockout; each further lockout of the same user or address doubles it.")]
    = 900,
    sign_in_max_lockout: Annotated[float, typer.Option(
        min=1, help="Longest lockout in seconds (the doubling stops there).")] = 4 * 3600,
) -> None:
    """Serve the review web app (http://HOST:PORT). Roles: ml-engineer may look; quality-lead and admin may also
    approve or reject (never a version they registered). Decisions and the audit trail are those of
    `defectops registry`."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from defectops.evaluation.gates import GateConfig
    from defectops.registry.review.app import ReviewSettings, create_app
    from defectops.registry.review.auth import ProxyAuth, load_or_create_secret
    from defectops.registry.review.throttle import SignInLimits

    home = _home()
    uri = resolve_tracking_uri(tracking_uri, home)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise fail(f"no registry at {uri}: run `defectops run` first, or pass --tracking-uri", EXIT_USAGE)
    users = _users_file(users_file)
    if not trust_proxy_headers and not users.is_file():
        raise fail(f"no users file at {users}: add a user with `defectops review add-user NAME --role quality-lead "
                   f"--users-file {users}` (or use --trust-proxy-headers behind an authenticating proxy)", EXIT_USAGE)
    try:
        proxy = ProxyAuth.build(trust_proxy_headers, trusted_proxy or ["127.0.0.1", "::1"], user_header, role_header,
                                forwarded_for=trust_forwarded_for)
        secret = load_or_create_secret(secret_file or home / "review" / "secret.key")
        sign_in = SignInLimits(user_failures=sign_in_user_limit, address_failures=sign_in_address_limit,
                               window_s=sign_in_window, lockout_s=sign_in_lockout, max_lockout_s=sign_in_max_lockout)
    except ValueError as e:  # AuthError, or a sign-in limit out of range
        raise fail(str(e), EXIT_USAGE) from None
    settings = ReviewSettings(tracking_uri=uri, secret=secret, lock_dir=home, users_file=users, proxy=proxy,
                              insecure_cookies=insecure_cookies, models=list(model or []),
                              max_regression=GateConfig().max_regression if max_regression is None
                              else max_regression, sign_in=sign_in)
    console.print(f"review page on http://{host}:{port} (registry {uri}, users {users}"
                  f"{', proxy headers trusted' if trust_proxy_headers else ''}; sign-in lockout after "
                  f"{sign_in_user_limit} failures per user, {sign_in_address_limit} per address in "
                  f"{sign_in_window:g} s)", highlight=False)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", proxy_headers=False,
                server_header=False)


@review_app.command("add-user")
def add_user_cmd(
    name: Annotated[str, typer.Argument(help="User name (letters, digits, '.', '_', '@', '-').")],
    role: Annotated[str, typer.Option("--role", help="ml-engineer, quality-lead or admin.")],
    users_file: UsersFile = None,
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the password from the first line of standard input instead of prompting.")]
    = False,
) -> None:
    """Add a user to the users file, or replace their role and password (written atomically, mode 0600)."""
    from defectops.registry.review.auth import AuthError, add_user

    path = _users_file(users_file)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != password:
            raise fail("the passwords differ", EXIT_USAGE)
    try:
        add_user(path, name, role, password)
    except AuthError as e:
        raise fail(str(e), EXIT_USAGE) from None
    console.print(f"user {name} ({role}) saved in {path}", highlight=False)


def register(app: typer.Typer) -> None:
    """``defectops review ...``."""
    app.add_typer(review_app, name="review")
