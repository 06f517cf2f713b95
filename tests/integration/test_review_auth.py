"""Review web app: authentication, roles, CSRF, cookie flags, proxy headers and the users file, over real HTTP.

One real ``defectops review`` server (session fixture ``review_server``) serves most tests; the proxy-header and
Secure-cookie variants run the same app with uvicorn in a thread. None of these tests changes the registry: every
decision they post is refused (the browser test makes the one approval). Sign-in throttling runs on a second real
server with small limits (``throttled_server``), so its lockouts never touch the shared one, and on an app with a fake
clock for the lockout's expiry.
"""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from review_support import PASSWORDS, Client, Reply, ReviewServer, serve_in_thread, start_review_server
from typer.testing import CliRunner

from defectops.registry.mlflow_registry import client as make_client
from defectops.registry.review.app import ReviewSettings, create_app
from defectops.registry.review.auth import ProxyAuth, UserStore, load_or_create_secret, verify_password
from defectops.registry.review.throttle import SignInLimits


def _decision_path(server: ReviewServer, version: str | None = None) -> str:
    reg = server.registry
    return f"/models/{reg['model']}/versions/{version or reg['challenger']}/decision"


def _aliases(server: ReviewServer) -> dict[str, str]:
    c = make_client(server.registry["uri"])
    return {k: str(v) for k, v in c.get_registered_model(server.registry["model"]).aliases.items()}


def test_anonymous_is_refused(review_server: ReviewServer) -> None:
    anon = Client(review_server.url)
    page = anon.get("/")
    assert page.status == 303  # a browser asking for a page is sent to sign in
    assert page.header("location") == "/login?next=/"
    reg = review_server.registry
    assert anon.get(f"/models/{reg['model']}/versions/2").header("location") == \
        f"/login?next=/models/{reg['model']}/versions/2"
    assert anon.get("/", accept="application/json").status == 401  # anything that is not a browser page: 401
    assert anon.get("/api/queue").status == 401
    assert anon.get(f"/models/{reg['model']}/history", accept="*/*").status == 401
    token = anon.get("/login").csrf()
    assert anon.post(_decision_path(review_server), {"csrf": token, "action": "approve", "reason": "x"}).status == 401
    assert anon.get("/healthz").status == 200


def test_wrong_password_and_unknown_user(review_server: ReviewServer) -> None:
    for name, password in (("quinn", "not-the-password"), ("nobody", "whatever-pass")):
        c = Client(review_server.url)
        r = c.login(name, password)
        assert r.status == 401
        assert "Wrong user name or password" in r.body
        assert c.get("/").status == 303  # still not signed in
    ok = Client(review_server.url)
    r = ok.login("quinn")
    assert r.status == 303
    assert r.header("location") == "/"
    assert ok.get("/").status == 200


def test_cookie_flags_insecure_dev_server(review_server: ReviewServer) -> None:
    r = Client(review_server.url).login("quinn")
    (set_cookie,) = r.cookies()
    assert set_cookie.startswith("defectops_review=")
    flags = [f.strip().lower() for f in set_cookie.split(";")]
    assert "httponly" in flags
    assert "samesite=lax" in flags
    assert "secure" not in flags  # --insecure-cookies: the dev/test server over plain http


def _settings(server: ReviewServer, tmp_path: Path, **kw: object) -> ReviewSettings:
    reg = server.registry
    args: dict = {"tracking_uri": reg["uri"], "secret": "s" * 40, "lock_dir": reg["home"],
                  "users_file": server.users_file, **kw}
    return ReviewSettings(**args)


def test_cookie_is_secure_by_default(review_server: ReviewServer, tmp_path: Path) -> None:
    with serve_in_thread(create_app(_settings(review_server, tmp_path))) as url:
        r = Client(url).login("quinn")
    (set_cookie,) = r.cookies()
    flags = [f.strip().lower() for f in set_cookie.split(";")]
    assert {"secure", "httponly", "samesite=lax"} <= set(flags)


def test_ml_engineer_cannot_decide(review_server: ReviewServer) -> None:
    c = Client(review_server.url)
    assert c.login("eng").status == 303
    page = c.get(f"/models/{review_server.registry['model']}/versions/{review_server.registry['challenger']}")
    assert page.status == 200
    assert 'data-testid="no-decision"' in page.body
    assert 'name="action" value="approve"' not in page.body
    before = _aliases(review_server)
    r = c.post(_decision_path(review_server), {"csrf": page.csrf(), "action": "approve", "reason": "ship it"})
    assert r.status == 403
    assert "may look at candidates but not decide" in r.body
    assert _aliases(review_server) == before


def test_csrf_token_is_required_and_bound_to_the_session(review_server: ReviewServer) -> None:
    quinn, other = Client(review_server.url), Client(review_server.url)
    quinn.login("quinn")
    other.login("ada")
    foreign = other.get("/").csrf()
    path = _decision_path(review_server)
    before = _aliases(review_server)
    for form in ({"action": "approve", "reason": "ok"}, {"csrf": "", "action": "approve", "reason": "ok"},
                 {"csrf": foreign, "action": "approve", "reason": "ok"},
                 {"csrf": quinn.get("/").csrf() + "x", "action": "approve", "reason": "ok"}):
        r = quinn.post(path, form)
        assert r.status == 403, form
        assert "security token" in r.body
    assert _aliases(review_server) == before
    anon = Client(review_server.url)
    anon.get("/login")
    r = anon.post("/login", {"username": "quinn", "password": PASSWORDS["quinn"], "next": "/"})
    assert r.status == 403  # the sign-in form is protected too (login CSRF)
    out = Client(review_server.url)
    out.login("quinn")
    assert out.post("/logout", {"csrf": "bad"}).status == 403
    assert out.post("/logout", {"csrf": out.get("/").csrf()}).status == 303
    assert out.get("/").status == 303


def test_refusals_from_governance_are_shown_with_their_status(review_server: ReviewServer) -> None:
    reg, before = review_server.registry, _aliases(review_server)
    quinn, eve = Client(review_server.url), Client(review_server.url)
    quinn.login("quinn")
    eve.login("eve")
    token = quinn.get("/").csrf()
    r = quinn.post(_decision_path(review_server), {"csrf": token, "action": "approve", "reason": "   "})
    assert r.status == 400
    assert "a reason is required" in r.body
    r = eve.post(_decision_path(review_server), {"csrf": eve.get("/").csrf(), "action": "approve", "reason": "mine"})
    assert r.status == 403
    assert "separation of duties" in r.body
    r = quinn.post(_decision_path(review_server, reg["champion"]), {"csrf": token, "action": "reject", "reason": "x"})
    assert r.status == 409
    assert "is the &#39;champion&#39;" in r.body
    r = quinn.post(_decision_path(review_server, "99"), {"csrf": token, "action": "approve", "reason": "x"})
    assert r.status == 404
    assert _aliases(review_server) == before


def test_queue_api(review_server: ReviewServer) -> None:
    c = Client(review_server.url)
    c.login("eng")
    r = c.get("/api/queue", accept="application/json")
    assert r.status == 200
    (model,) = json.loads(r.body)
    assert model["champion"] == review_server.registry["champion"]
    assert [x["version"] for x in model["candidates"]] == [review_server.registry["challenger"]]
    assert r.header("content-security-policy") is not None


@pytest.mark.parametrize(("enabled", "trusted", "role", "accepted"), [
    (False, ["127.0.0.1"], "quality-lead", False),   # not enabled: headers are ignored
    (True, ["10.0.0.0/8"], "quality-lead", False),   # enabled, but this peer is not a trusted proxy
    (True, ["127.0.0.1"], "root", False),            # trusted, unknown role
    (True, ["127.0.0.0/8"], "quality-lead", True),
], ids=["disabled", "untrusted-peer", "bad-role", "trusted"])
def test_proxy_headers(review_server: ReviewServer, tmp_path: Path, enabled: bool, trusted: list[str], role: str,
                       accepted: bool) -> None:
    proxy = ProxyAuth.build(enabled, trusted, "X-Auth-User", "X-Auth-Role")
    with serve_in_thread(create_app(_settings(review_server, tmp_path, proxy=proxy, insecure_cookies=True))) as url:
        r = Client(url).get("/", headers={"X-Auth-User": "pat", "X-Auth-Role": role}, accept="application/json")
    assert (r.status == 200) is accepted, r.status
    if accepted:
        assert "pat" in r.body and "quality-lead" in r.body


def test_add_user_roundtrip(tmp_path: Path) -> None:
    from defectops.pipelines.cli import app

    users = tmp_path / "review" / "users.json"
    runner = CliRunner()
    for name in ("amy", "bob"):
        r = runner.invoke(app, ["review", "add-user", name, "--role", "quality-lead", "--users-file", str(users),
                                "--password-stdin"], input="same password 1\n")
        assert r.exit_code == 0, r.output
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    data = json.loads(users.read_text())["users"]
    assert data["amy"]["password"] != data["bob"]["password"]  # per-user salt
    assert data["amy"]["password"].startswith("scrypt$")
    assert "same password" not in users.read_text()
    assert verify_password("same password 1", data["bob"]["password"])
    store = UserStore(users)
    assert store.authenticate("amy", "same password 1") is not None
    assert store.authenticate("amy", "same password 2") is None
    r = runner.invoke(app, ["review", "add-user", "amy", "--role", "ml-engineer", "--users-file", str(users),
                            "--password-stdin"], input="a new password\n")
    assert r.exit_code == 0
    assert store.get("amy").role == "ml-engineer"  # re-read on change
    assert store.authenticate("amy", "same password 1") is None
    bad = [(["--role", "boss"], "pass word 1"), (["--role", "admin"], "short")]
    for opts, pw in bad:
        r = runner.invoke(app, ["review", "add-user", "cat", *opts, "--users-file", str(users), "--password-stdin"],
                          input=pw + "\n")
        assert r.exit_code == 2, r.output
    assert "cat" not in json.loads(users.read_text())["users"]


def test_secret_file_is_created_private(tmp_path: Path) -> None:
    path = tmp_path / "review" / "secret.key"
    secret = load_or_create_secret(path, env={})
    assert len(secret) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path, env={}) == secret
    path.chmod(0o644)
    with pytest.raises(ValueError, match="readable by others"):
        load_or_create_secret(path, env={})


# --------------------------------------------------------------------------------------------- sign-in throttling
WRONG = "Wrong user name or password."
LOCKED = "Too many sign-in attempts; try again in 2 minutes."


@pytest.fixture(scope="module")
def throttled_server(review_registry: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReviewServer]:
    """The real ``defectops review`` with small sign-in limits (3 per user, 5 per address, 120 s lockout) that counts
    the X-Forwarded-For address of its trusted proxy (loopback, i.e. these tests), so each test is its own client."""
    with start_review_server(review_registry, tmp_path_factory.mktemp("review-throttled"),
                             "--sign-in-user-limit", "3", "--sign-in-address-limit", "5", "--sign-in-window", "600",
                             "--sign-in-lockout", "120", "--trust-forwarded-for") as server:
        yield server


def _sign_in(url: str, name: str, password: str, address: str | None = None) -> tuple[Client, Reply]:
    c = Client(url)
    headers = {"X-Forwarded-For": address} if address else {}
    token = c.get("/login", headers=headers).csrf()
    return c, c.post("/login", {"csrf": token, "username": name, "password": password, "next": "/"},
                     headers=headers)


def _page(r: Reply) -> str:
    """The page without its per-session CSRF token: what may differ between two answers."""
    return re.sub(r'name="csrf" value="[^"]+"', 'name="csrf" value=""', r.body)


def test_sign_in_lockout_does_not_reveal_whether_the_user_exists(throttled_server: ReviewServer) -> None:
    url = throttled_server.url
    known = [_sign_in(url, "quinn", "not-the-password", "198.51.100.1")[1] for _ in range(3)]
    unknown = [_sign_in(url, "nobody", "not-the-password", "198.51.100.2")[1] for _ in range(3)]
    for a, b in zip(known, unknown, strict=True):  # wrong password and unknown user: the same answer
        assert (a.status, b.status) == (401, 401)
        assert WRONG in a.body
        assert _page(a) == _page(b)
    c, right = _sign_in(url, "quinn", PASSWORDS["quinn"], "198.51.100.1")  # the right password, now refused
    _, nobody = _sign_in(url, "nobody", "not-the-password", "198.51.100.2")
    for r in (right, nobody):
        assert r.status == 429
        assert LOCKED in r.body
        assert WRONG not in r.body
        assert int(r.header("retry-after") or 0) in (119, 120)
    assert _page(right) == _page(nobody)
    assert c.get("/").status == 303  # not signed in
    assert _sign_in(url, "quinn", PASSWORDS["quinn"], "198.51.100.3")[1].status == 429  # from any address
    log = throttled_server.log.read_text()
    assert "sign-in lockout: user 'quinn' locked for 120 s after 3 failed attempts (user 'quinn' from 198.51.100.1)" \
        in log
    assert "sign-in lockout: user 'nobody' locked for 120 s" in log


def test_sign_in_address_limit_catches_user_name_spraying(throttled_server: ReviewServer) -> None:
    url, addr = throttled_server.url, "198.51.100.20"
    for _ in range(3):
        assert _sign_in(url, "eng", "not-the-password", addr)[1].status == 401
    assert _sign_in(url, "eng", PASSWORDS["eng"], addr)[1].status == 429  # eng is locked (and that is not counted)
    ada, r = _sign_in(url, "ada", PASSWORDS["ada"], addr)  # another user from the same address still may
    assert r.status == 303
    assert ada.get("/").status == 200
    assert _sign_in(url, "ada", "not-the-password", addr)[1].status == 401  # 4 failures from this address
    assert _sign_in(url, "no-such-user", "not-the-password", addr)[1].status == 401  # 5: the address is locked
    for name, password in (("ada", PASSWORDS["ada"]), ("eve", PASSWORDS["eve"]), ("someone", "x" * 12)):
        r = _sign_in(url, name, password, addr)[1]
        assert r.status == 429, name
        assert LOCKED in r.body
    assert _sign_in(url, "ada", PASSWORDS["ada"], "198.51.100.21")[1].status == 303  # other addresses are not
    assert "sign-in lockout: address '198.51.100.20' locked for 120 s after 5 failed attempts (user 'no-such-user'" \
        in throttled_server.log.read_text()


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_sign_in_lockout_ends_on_the_app_clock_and_forged_forwarded_for_is_ignored(review_server: ReviewServer,
                                                                                   tmp_path: Path) -> None:
    clock = _Clock()
    limits = SignInLimits(user_failures=10, address_failures=3, window_s=60, lockout_s=30, max_lockout_s=60)
    settings = _settings(review_server, tmp_path, insecure_cookies=True, sign_in=limits, clock=clock)
    with serve_in_thread(create_app(settings)) as url:
        for i, name in enumerate(("amy", "bob", "quinn")):  # a different forged client address each time
            assert _sign_in(url, name, "not-the-password", f"192.0.2.{i}")[1].status == 401
        r = _sign_in(url, "quinn", PASSWORDS["quinn"], "192.0.2.99")[1]
        assert r.status == 429  # no trusted proxy: every attempt counted for the socket peer (127.0.0.1)
        assert r.header("retry-after") == "30"
        assert "try again in 1 minute." in r.body
        clock.t += 30
        assert _sign_in(url, "quinn", PASSWORDS["quinn"])[1].status == 303
