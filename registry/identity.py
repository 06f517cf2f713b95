"""Who is deciding: the identity behind ``defectops registry approve|reject|rollback``.

- **A shared registry** (the tracking URI is an ``http(s)://`` MLflow server): the user is the one the server
  authenticates (MLflow's basic-auth app: ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, or a token in
  ``MLFLOW_TRACKING_TOKEN`` with the user name in ``MLFLOW_TRACKING_USERNAME``), checked against the server before
  anything is decided, and the role comes from a mapping the MLflow admin controls: the user's permission on the
  registered model (:func:`role_from_permission`: ``MANAGE`` = quality lead, an MLflow admin = admin, anything else =
  ML engineer). ``--as`` / ``--role`` are refused there: identity on the command line would be self-declared.
- **The embedded registry** (``sqlite:///`` or a local folder: one machine, no server): there is no authentication
  to ask. The local user is used (``--as``, ``DEFECTOPS_USER`` or the OS user) with the declared role, and the trail
  records ``identity = embedded-registry, declared`` so nobody mistakes it for an authenticated decision.

Separation of duties therefore holds against dishonest users only on a shared registry with authentication on; the
review page keeps its own sign-in (and, behind a proxy, its trusted headers).
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping
from dataclasses import dataclass

from defectops.registry.governance import GovernanceError

__all__ = ["AUTHENTICATED", "DECLARED", "Identity", "IdentityError", "is_shared", "resolve_identity",
           "role_from_permission"]

AUTHENTICATED = "mlflow-basic-auth"
DECLARED = "embedded-registry, declared"


class IdentityError(GovernanceError):
    """The decider's identity cannot be established (or was self-declared against a shared registry)."""


@dataclass(frozen=True)
class Identity:
    user: str
    role: str
    source: str


def is_shared(tracking_uri: str) -> bool:
    """A registry other users reach over the network (an MLflow server), as opposed to the embedded one."""
    return tracking_uri.startswith(("http://", "https://"))


def role_from_permission(permission: str, *, is_admin: bool) -> str:
    """Pure: the DefectOps role of a user with MLflow ``permission`` on the registered model."""
    if is_admin:
        return "admin"
    return "quality-lead" if permission.upper() == "MANAGE" else "ml-engineer"


def resolve_identity(tracking_uri: str, model: str, *, declared_user: str | None, declared_role: str | None,
                     env: Mapping[str, str] | None = None) -> Identity:
    """The identity a decision is recorded under (module docstring); :class:`IdentityError` with the fix."""
    env = os.environ if env is None else env
    if not is_shared(tracking_uri):
        user = declared_user or env.get("DEFECTOPS_USER") or getpass.getuser()
        return Identity(user, declared_role or "ml-engineer", DECLARED)
    if declared_user is not None or declared_role is not None:
        raise IdentityError(f"--as/--role are refused against the shared registry at {tracking_uri}: your user comes "
                            "from MLflow's authentication (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) and "
                            "your role from your permission on the model (MANAGE: quality-lead), set by the MLflow "
                            "admin")
    user = env.get("MLFLOW_TRACKING_USERNAME", "")
    if not user or not (env.get("MLFLOW_TRACKING_PASSWORD") or env.get("MLFLOW_TRACKING_TOKEN")):
        raise IdentityError(f"deciding on the shared registry at {tracking_uri} needs your MLflow credentials: set "
                            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
    return _ask_server(tracking_uri, model, user)


def _refusal(tracking_uri: str, user: str, error: Exception) -> IdentityError:
    """What a failed identity check means, in one line with the fix."""
    text, code = str(error), str(getattr(error, "error_code", ""))
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or "401" in text or "Unauthorized" in text:
        return IdentityError(f"the registry at {tracking_uri} refused the credentials of {user!r}: check "
                             "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    if code == "ENDPOINT_NOT_FOUND" or "404" in text:
        return IdentityError(f"the registry at {tracking_uri} has no authentication (start it with `mlflow server "
                             "--app-name basic-auth`): decisions on a shared registry need an authenticated user")
    return IdentityError(f"could not establish {user!r}'s identity at {tracking_uri}: {text[:200]}")


def _ask_server(tracking_uri: str, model: str, user: str) -> Identity:
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    try:
        auth = get_app_client("basic-auth", tracking_uri=tracking_uri)
        account = auth.get_user(user)
        permission = auth.get_user_permission(user, "registered_model", model).permission
    except (MlflowException, OSError) as e:  # RestException is an MlflowException
        raise _refusal(tracking_uri, user, e) from None
    return Identity(account.username, role_from_permission(permission, is_admin=bool(account.is_admin)),
                    AUTHENTICATED)
