"""The review page's sign-in throttle (registry/review/throttle.py) on a fake clock: counting, window expiry, growing
lockouts, reset on success, the per-address limit, and the trusted-proxy client address (registry/review/auth.py)."""

from __future__ import annotations

import pytest

from defectops.registry.review.auth import ProxyAuth
from defectops.registry.review.throttle import SignInLimits, SignInThrottle, address_key, retry_message

A, B = "198.51.100.7", "203.0.113.9"


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _throttle(**kw: float) -> tuple[SignInThrottle, FakeClock]:
    limits = {"user_failures": 3, "address_failures": 10, "window_s": 60, "lockout_s": 100, "max_lockout_s": 350,
              **kw}
    clock = FakeClock()
    return SignInThrottle(SignInLimits(**limits), clock), clock  # type: ignore[arg-type]


def _fail(t: SignInThrottle, user: str, address: str = A, n: int = 1) -> None:
    for _ in range(n):
        assert not t.admit(user, address).refused


def test_counts_failures_and_locks_the_user_name() -> None:
    t, clock = _throttle()
    _fail(t, "quinn", n=2)
    third = t.admit("quinn", A)
    assert not third.refused  # the attempt that reaches the limit is still checked
    assert [(x.kind, x.key, x.seconds, x.failures) for x in third.lockouts] == [("user", "quinn", 100, 3)]
    clock.t += 1
    refused = t.admit("quinn", B)  # locked for every address
    assert refused.refused
    assert refused.retry_after_s == pytest.approx(99)
    assert not t.admit("ada", A).refused  # another user from the same address is not locked


def test_failures_older_than_the_window_do_not_count() -> None:
    t, clock = _throttle()
    _fail(t, "quinn", n=2)
    clock.t += 61
    _fail(t, "quinn", n=2)  # 2 in the window, not 4
    assert t.admit("quinn", A).lockouts  # the third within the window locks
    assert t.admit("quinn", A).refused


def test_lockout_expires_and_doubles_up_to_the_cap() -> None:
    t, clock = _throttle()
    seen = []
    for _ in range(4):
        _fail(t, "nobody", n=2)
        (lock,) = t.admit("nobody", A).lockouts
        seen.append(lock.seconds)
        clock.t += lock.seconds - 1
        assert t.admit("nobody", A).refused
        clock.t += 1
    assert seen == [100, 200, 350, 350]  # doubling, capped at max_lockout_s
    assert not t.admit("nobody", A).refused  # the last lockout is over


def test_lockout_growth_is_forgotten_after_a_quiet_max_lockout() -> None:
    t, clock = _throttle()
    _fail(t, "quinn", n=3)
    clock.t += 100  # first lockout (100 s) over
    _fail(t, "quinn", n=3)
    clock.t += 200 + 350  # second lockout (200 s) over, then a whole max_lockout_s without failures
    _fail(t, "quinn", n=2)
    (lock,) = t.admit("quinn", A).lockouts
    assert lock.seconds == 100


def test_success_resets_the_user_but_not_the_address() -> None:
    t, clock = _throttle(address_failures=7)
    _fail(t, "quinn", n=2)
    t.succeeded(t.admit("quinn", A))
    _fail(t, "quinn", n=2)  # counts from zero again: 2 < 3
    ok = t.admit("quinn", A)
    assert [x.kind for x in ok.lockouts] == ["user"]  # the attempt in flight reaches the limit ...
    t.succeeded(ok)  # ... but the right password takes the lock back
    assert not t.admit("quinn", A).refused
    # the address still holds its 4 failures (the two successes were taken back) + quinn's fifth
    assert t.admit("eve", A).lockouts == []
    assert [x.kind for x in t.admit("ada", A).lockouts] == ["address"]
    clock.t += 1
    assert t.admit("amy", A).refused


def test_user_lock_growth_is_reset_by_success() -> None:
    t, clock = _throttle()
    _fail(t, "quinn", n=3)
    clock.t += 100
    t.succeeded(t.admit("quinn", A))
    _fail(t, "quinn", n=2)
    (lock,) = t.admit("quinn", A).lockouts
    assert lock.seconds == 100  # not 200: the success forgot the earlier lockout


def test_address_limit_catches_user_name_spraying() -> None:
    t, clock = _throttle(user_failures=5, address_failures=4)
    for name in ("amy", "bob", "cat"):
        _fail(t, name)
    last = t.admit("dan", A)
    assert [x.kind for x in last.lockouts] == ["address"]
    clock.t += 1
    for name in ("quinn", "amy", "zed"):  # every name, known or not, from that address
        r = t.admit(name, A)
        assert r.refused
        assert r.retry_after_s == pytest.approx(99)
    assert not t.admit("quinn", B).refused  # other addresses are not affected


def test_success_of_the_attempt_that_reached_the_address_limit_undoes_that_lock() -> None:
    t, _ = _throttle(address_failures=3)
    _fail(t, "amy")
    _fail(t, "bob")
    ok = t.admit("quinn", A)
    assert [x.kind for x in ok.lockouts] == ["address"]
    t.succeeded(ok)
    third = t.admit("cat", A)  # the two earlier failures still count
    assert [x.kind for x in third.lockouts] == ["address"]


def test_concurrent_attempts_cannot_exceed_the_limit() -> None:
    t, _ = _throttle()
    admitted = [t.admit("quinn", A) for _ in range(3)]  # all in flight, none finished yet
    assert not any(a.refused for a in admitted)
    assert t.admit("quinn", A).refused  # the fourth is refused before any password check returned


def test_refused_attempts_are_not_counted() -> None:
    t, clock = _throttle()
    _fail(t, "quinn", n=3)
    for _ in range(20):
        assert t.admit("quinn", A).refused
    clock.t += 100
    (lock,) = [x for _ in range(3) for x in t.admit("quinn", A).lockouts]
    assert lock.seconds == 200


def test_a_zero_limit_turns_that_counter_off() -> None:
    t, _ = _throttle(address_failures=0)
    for i in range(30):
        assert not t.admit(f"user{i}", A).refused


def test_keys_are_bounded() -> None:
    t, clock = _throttle(max_keys=50)
    _fail(t, "quinn", n=3)  # locked
    for i in range(200):
        t.admit(f"u{i}", f"10.0.{i}.1")
    assert len(t._keys) <= 50
    clock.t += 61
    for i in range(200, 260):
        t.admit(f"u{i}", f"10.1.{i % 250}.1")
    assert len(t._keys) <= 50


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="at least the first"):
        SignInLimits(lockout_s=100, max_lockout_s=50)
    with pytest.raises(ValueError, match="0 \\(off\\) or more"):
        SignInLimits(user_failures=-1)


def test_message_does_not_depend_on_the_user() -> None:
    assert retry_message(1) == "Too many sign-in attempts; try again in 1 minute."
    assert retry_message(60) == "Too many sign-in attempts; try again in 1 minute."
    assert retry_message(61) == "Too many sign-in attempts; try again in 2 minutes."


def test_address_key() -> None:
    assert address_key("192.0.2.1") == "192.0.2.1"
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address_key("unknown") == "unknown"


@pytest.mark.parametrize(("proxy", "peer", "xff", "expected"), [
    (ProxyAuth.build(False, ["127.0.0.1"]), "127.0.0.1", "203.0.113.5", "127.0.0.1"),  # not trusted: the peer
    (ProxyAuth.build(False, ["127.0.0.1"], forwarded_for=True), "10.9.9.9", "203.0.113.5", "10.9.9.9"),  # untrusted
    (ProxyAuth.build(False, ["127.0.0.1"], forwarded_for=True), "127.0.0.1", "203.0.113.5", "203.0.113.5"),
    (ProxyAuth.build(True, ["127.0.0.1"]), "127.0.0.1", "203.0.113.5", "203.0.113.5"),  # implied by proxy auth
    # the client's own forged hops (left) are skipped: the last hop the trusted proxies did not add is the client
    (ProxyAuth.build(False, ["127.0.0.1", "10.0.0.0/8"], forwarded_for=True), "127.0.0.1",
     "1.2.3.4, 203.0.113.5, 10.0.0.7", "203.0.113.5"),
    (ProxyAuth.build(False, ["127.0.0.1"], forwarded_for=True), "127.0.0.1", "1.2.3.4, junk", "127.0.0.1"),
    (ProxyAuth.build(False, ["127.0.0.1"], forwarded_for=True), "127.0.0.1", None, "127.0.0.1"),
    (ProxyAuth.build(False, ["127.0.0.1"], forwarded_for=True), None, "203.0.113.5", "unknown"),
], ids=["off", "untrusted-peer", "trusted", "proxy-auth", "forged-hops", "malformed", "no-header", "no-peer"])
def test_client_address(proxy: ProxyAuth, peer: str | None, xff: str | None, expected: str) -> None:
    assert proxy.client_address(peer, xff) == expected
