"""Who may use the review page: a users file with salted password hashes, CSRF tokens, and optional proxy headers.

What: a JSON users file (``{"version": 1, "users": {"<name>": {"role": ..., "password": "scrypt$..."}}}``) with the
roles ``ml-engineer`` (may look), ``quality-lead`` and ``admin`` (may also decide; the rules themselves live in
:mod:`registry.governance`). Passwords are hashed with the standard library's scrypt and a random 16-byte salt per
user and compared in constant time; :func:`add_user` rewrites the file atomically with mode 0600. CSRF tokens are
itsdangerous signatures of a random nonce kept in the (signed) session cookie, so a token is bound to one session
and expires. Behind a reverse proxy that already authenticates people, :class:`ProxyAuth` may take the user and
role from request headers, but only when explicitly enabled and only from the configured proxy addresses; from the
same addresses it may also take the client address (``X-Forwarded-For``) that sign-in throttling counts
(:mod:`registry.review.throttle`).

Why: the page moves the production model; anonymous use, a guessable password store or a cross-site form post must
not be able to do that. Everything here is standard library plus itsdangerous (already a Starlette dependency).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer

__all__ = ["ROLES", "AuthError", "CsrfTokens", "Identity", "ProxyAuth", "UserStore", "add_user", "hash_password",
           "load_or_create_secret", "verify_password"]

ROLES = ("ml-engineer", "quality-lead", "admin")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 8
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_DKLEN = 32


class AuthError(ValueError):
    """A users file, user name, role, password or secret is not acceptable; the message says how to fix it."""


@dataclass(frozen=True)
class Identity:
    """A signed-in person: ``via`` is ``password`` or ``proxy``."""

    name: str
    role: str
    via: str = "password"


# ------------------------------------------------------------------------------------------------- passwords
def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$<salt>$<hash>`` (base64) with a fresh random salt unless one is given."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=_DKLEN, maxmem=64 * 1024 * 1024, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of ``password`` against a :func:`hash_password` string; ``False`` for a malformed one."""
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt, digest = base64.b64decode(salt_b64, validate=True), base64.b64decode(digest_b64, validate=True)
        candidate = hashlib.scrypt(password.encode(), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(digest),
                                   maxmem=64 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(candidate, digest)


_DUMMY_HASH = hash_password("not a password", salt=b"\0" * 16)  # equalises timing for unknown users


# ------------------------------------------------------------------------------------------------ users file
def _read_users(path: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        raise AuthError(f"users file {path} is unreadable ({e}); fix it or recreate it with "
                        "`defectops review add-user`") from None
    users = data.get("users") if isinstance(data, dict) else None
    if not isinstance(users, dict):
        raise AuthError(f"users file {path} has no \"users\" object; recreate it with `defectops review add-user`")
    return {str(k): dict(v) for k, v in users.items() if isinstance(v, dict)}


def add_user(path: Path, name: str, role: str, password: str) -> None:
    """Add or replace ``name`` in the users file at ``path`` (created with mode 0600), atomically."""
    if not NAME_RE.match(name):
        raise AuthError(f"user name {name!r} is not allowed: use 1-64 letters, digits, '.', '_', '@' or '-'")
    if role not in ROLES:
        raise AuthError(f"role {role!r} is unknown; use one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD:
        raise AuthError(f"the password is too short: use at least {MIN_PASSWORD} characters")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        users = _read_users(path)
        users[name] = {"role": role, "password": hash_password(password)}
        body = json.dumps({"version": 1, "users": dict(sorted(users.items()))}, indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:  # mkstemp creates it 0600
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)


class UserStore:
    """The users file, re-read when it changes (so a removed user or a changed role takes effect at once)."""

    def __init__(self, path: Path | None) -> None:
        self.path = None if path is None else Path(path)
        self._stamp: tuple[float, int] | None = None
        self._users: dict[str, dict[str, str]] = {}
        if self.path is not None:
            self._load()

    def _load(self) -> dict[str, dict[str, str]]:
        if self.path is None:
            return {}
        try:
            st = self.path.stat()
            stamp = (st.st_mtime, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._users, self._stamp = _read_users(self.path), stamp
        return self._users

    def get(self, name: str) -> Identity | None:
        """The user ``name`` with a valid role, or ``None``."""
        u = self._load().get(name)
        if not u or u.get("role") not in ROLES:
            return None
        return Identity(name, str(u["role"]))

    def authenticate(self, name: str, password: str) -> Identity | None:
        """The user if ``password`` is right; the same work is done for an unknown name."""
        u = self._load().get(name)
        ok = verify_password(password, str(u.get("password", "")) if u else _DUMMY_HASH)
        return self.get(name) if ok and u else None


# ------------------------------------------------------------------------------------------------- secrets
def load_or_create_secret(path: Path, env: Mapping[str, str] | None = None,
                          env_var: str = "DEFECTOPS_REVIEW_SECRET") -> str:
    """The session-signing secret: ``$DEFECTOPS_REVIEW_SECRET``, else the file at ``path`` (created with 32 random
    bytes and mode 0600 when absent). A file readable by group or others is refused."""
    env = os.environ if env is None else env
    if env.get(env_var):
        if len(env[env_var]) < 32:
            raise AuthError(f"${env_var} is too short: use at least 32 random characters")
        return env[env_var]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fd = -1
    if fd >= 0:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise AuthError(f"secret file {path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")
    secret = path.read_text(encoding="utf-8").strip()
    if len(secret) < 32:
        raise AuthError(f"secret file {path} holds fewer than 32 characters; delete it to generate a new one")
    return secret


# ---------------------------------------------------------------------------------------------------- CSRF
class CsrfTokens:
    """Signed CSRF tokens bound to a session: the session keeps a random nonce, forms carry its signature."""

    KEY = "csrf_nonce"

    def __init__(self, secret: str, max_age_s: int = 12 * 3600) -> None:
        self._s = URLSafeTimedSerializer(secret, salt="defectops-review-csrf")
        self.max_age_s = max_age_s

    def issue(self, session: MutableMapping[str, Any]) -> str:
        """A token for the forms of this session (creating its nonce if needed)."""
        if not isinstance(session.get(self.KEY), str):
            session[self.KEY] = secrets.token_urlsafe(24)
        return str(self._s.dumps(session[self.KEY]))

    def valid(self, session: Mapping[str, Any], token: str | None) -> bool:
        """Whether ``token`` was issued for this session and has not expired."""
        nonce = session.get(self.KEY)
        if not token or not isinstance(nonce, str):
            return False
        try:
            value = self._s.loads(token, max_age=self.max_age_s)
        except BadSignature:
            return False
        return isinstance(value, str) and hmac.compare_digest(value, nonce)


# ------------------------------------------------------------------------------------------------ proxy mode
@dataclass(frozen=True)
class ProxyAuth:
    """Identity from a trusted reverse proxy's headers (off unless ``enabled``; only from ``trusted`` addresses), and
    the client address it forwards (``X-Forwarded-For``, used when ``enabled`` or ``forwarded_for``)."""

    enabled: bool = False
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(default_factory=tuple)
    user_header: str = "X-Forwarded-User"
    role_header: str = "X-Forwarded-Role"
    forwarded_for: bool = False

    @classmethod
    def build(cls, enabled: bool, trusted: Iterable[str], user_header: str = "X-Forwarded-User",
              role_header: str = "X-Forwarded-Role", forwarded_for: bool = False) -> ProxyAuth:
        try:
            nets = tuple(ipaddress.ip_network(t.strip(), strict=False) for t in trusted if t.strip())
        except ValueError as e:
            raise AuthError(f"trusted proxy address: {e}") from None
        if (enabled or forwarded_for) and not nets:
            raise AuthError("proxy headers are enabled but no trusted proxy address is configured")
        return cls(enabled, nets, user_header, role_header, forwarded_for)

    def _trusted_peer(self, client_host: str | None) -> bool:
        try:
            peer = ipaddress.ip_address(client_host or "")
        except ValueError:
            return False
        return any(peer in net for net in self.trusted)

    def identity(self, client_host: str | None, headers: Mapping[str, str]) -> Identity | None:
        """The identity the proxy asserts, or ``None`` (disabled, untrusted peer, missing or invalid headers)."""
        if not self.enabled or not self._trusted_peer(client_host):
            return None
        name, role = headers.get(self.user_header, "").strip(), headers.get(self.role_header, "").strip()
        if not NAME_RE.match(name) or role not in ROLES:
            return None
        return Identity(name, role, via="proxy")

    def client_address(self, client_host: str | None, forwarded_for: str | None) -> str:
        """The address the request comes from: the socket peer, or, when the peer is a trusted proxy and forwarded
        addresses are trusted, the last ``X-Forwarded-For`` hop that is not itself a trusted proxy (earlier hops
        are whatever the client wrote, so they are never believed)."""
        peer = client_host or "unknown"
        if not (self.enabled or self.forwarded_for) or not forwarded_for or not self._trusted_peer(client_host):
            return peer
        for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
            try:
                ip = ipaddress.ip_address(hop)
            except ValueError:
                return peer  # a malformed hop: the proxy's own address is all that is known
            if not any(ip in net for net in self.trusted):
                return str(ip)
        return peer


def parse_form(body: bytes, fields: Sequence[str]) -> dict[str, str]:
    """The first value of each of ``fields`` in an ``application/x-www-form-urlencoded`` body ('' when absent)."""
    from urllib.parse import parse_qs

    parsed = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True, max_num_fields=20)
    return {f: parsed.get(f, [""])[0] for f in fields}
