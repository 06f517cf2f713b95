"""Sign-in throttling for the review page: failed attempts counted per user name and per client address.

What: :class:`SignInThrottle` keeps, for every user name typed into the sign-in form (known or not) and for every
client address, the failed attempts of the last ``window_s`` seconds. When a key reaches its limit
(``user_failures``, default 5, or ``address_failures``, default 20, per 15 minutes) it is locked: further attempts
for that user name, or from that address, are refused without checking the password, for ``lockout_s`` (15 min)
the first time, doubling with each further lockout of the same key up to ``max_lockout_s`` (4 h). A successful
sign-in resets the user name's count and lockout growth, never the address's (one valid account must not let an
address go on guessing other users' passwords). A key's lockout growth is forgotten after ``max_lockout_s`` without
a new lockout. IPv6 addresses are counted per /64 (one host usually holds a whole /64).

Every attempt is counted as a failure from the moment it is admitted (:meth:`SignInThrottle.admit`) until
:meth:`SignInThrottle.succeeded` takes it back, so concurrent requests cannot slip more guesses past the limit than
the limit allows. The state lives in memory and the clock is injected (``time.monotonic`` by default), so the rules
are unit-tested without sleeping. Several review processes (replicas, workers) each keep their own counts: the
effective limits are then the configured ones times the number of processes, and a restart forgets everything. At
most ``max_keys`` keys are kept; past that, keys with nothing left to remember are dropped first, then the least
recently used ones (so an attacker with very many addresses and names can make it forget an old lockout).

Why: without it a password can be guessed at the speed of scrypt, and many user names can be tried from one
address. The refusal does not depend on whether the user exists (unknown names are counted and locked alike), so the
page still does not reveal who has an account.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Attempt", "Lockout", "SignInLimits", "SignInThrottle", "address_key", "retry_message"]


@dataclass(frozen=True)
class SignInLimits:
    """The throttling rules (seconds); a limit of 0 turns that counter off."""

    user_failures: int = 5
    address_failures: int = 20
    window_s: float = 15 * 60
    lockout_s: float = 15 * 60
    max_lockout_s: float = 4 * 3600
    max_keys: int = 100_000

    def __post_init__(self) -> None:
        if self.user_failures < 0 or self.address_failures < 0:
            raise ValueError("sign-in failure limits must be 0 (off) or more")
        if self.window_s <= 0 or self.lockout_s <= 0:
            raise ValueError("the sign-in window and lockout must be positive")
        if self.max_lockout_s < self.lockout_s:
            raise ValueError("the longest sign-in lockout must be at least the first one")
        if self.max_keys < 1:
            raise ValueError("max_keys must be at least 1")


@dataclass(frozen=True)
class Lockout:
    """A key that was just locked: ``kind`` is ``user`` or ``address``."""

    kind: str
    key: str
    seconds: float
    failures: int


@dataclass
class _State:
    failures: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0
    strikes: int = 0           # lockouts so far (the next one lasts lockout_s * 2**strikes)
    last_lockout_end: float = 0.0


@dataclass
class Attempt:
    """An admitted attempt (counted as a failure until :meth:`SignInThrottle.succeeded`), or a refused one."""

    user: str
    address: str
    at: float
    retry_after_s: float = 0.0  # > 0: refused, the password must not be checked
    lockouts: list[Lockout] = field(default_factory=list)  # the locks this attempt's count set off
    _undo: dict[tuple[str, str], tuple[float, int, float, tuple[float, ...]]] = field(default_factory=dict,
                                                                                       repr=False)

    @property
    def refused(self) -> bool:
        return self.retry_after_s > 0


def address_key(address: str) -> str:
    """The address as counted: IPv4 as is, IPv4-mapped IPv6 as IPv4, other IPv6 as its /64; anything else as is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def retry_message(retry_after_s: float) -> str:
    """The refusal shown for every locked attempt, whoever the user is and whether they exist."""
    minutes = max(1, math.ceil(retry_after_s / 60))
    return f"Too many sign-in attempts; try again in {minutes} minute{'s' if minutes != 1 else ''}."


class SignInThrottle:
    """Failed sign-in attempts per user name and per client address, in this process's memory (see the module)."""

    def __init__(self, limits: SignInLimits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or SignInLimits()
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: OrderedDict[tuple[str, str], _State] = OrderedDict()

    def _limit(self, kind: str) -> int:
        return self.limits.user_failures if kind == "user" else self.limits.address_failures

    def _state(self, k: tuple[str, str], now: float) -> _State:
        st = self._keys.get(k)
        if st is None:
            st = self._keys[k] = _State()
        else:
            self._keys.move_to_end(k)
        while st.failures and st.failures[0] <= now - self.limits.window_s:
            st.failures.popleft()
        if st.strikes and st.locked_until <= now and now - st.last_lockout_end >= self.limits.max_lockout_s:
            st.strikes = 0  # a whole longest lockout without a new one: start again from lockout_s
        return st

    def _idle(self, st: _State, now: float) -> bool:
        return (st.locked_until <= now and (not st.failures or st.failures[-1] <= now - self.limits.window_s)
                and (not st.strikes or now - st.last_lockout_end >= self.limits.max_lockout_s))

    def _prune(self, now: float) -> None:
        for k in [k for k, st in self._keys.items() if self._idle(st, now)]:
            del self._keys[k]
        keep = max(1, self.limits.max_keys * 9 // 10)  # room for the next keys without pruning on each one
        while len(self._keys) > keep:
            self._keys.popitem(last=False)  # least recently used first

    def admit(self, user: str, address: str) -> Attempt:
        """Count an attempt for ``user`` from ``address``: refused (``retry_after_s`` > 0, nothing counted) while
        either is locked; otherwise counted as a failure now, which may lock either key for later attempts."""
        now = self._clock()
        keys = [("user", user[:128]), ("address", address_key(address))]
        keys = [k for k in keys if self._limit(k[0]) > 0]
        with self._lock:
            if len(self._keys) + len(keys) > self.limits.max_keys:
                self._prune(now)
            states = [(k, self._state(k, now)) for k in keys]
            wait = max((st.locked_until - now for _, st in states), default=0.0)
            attempt = Attempt(user[:128], address_key(address), now)
            if wait > 0:
                attempt.retry_after_s = wait
                return attempt
            for k, st in states:
                st.failures.append(now)
                if len(st.failures) >= self._limit(k[0]):
                    attempt._undo[k] = (st.locked_until, st.strikes, st.last_lockout_end, tuple(st.failures)[:-1])
                    seconds = min(self.limits.lockout_s * 2 ** min(st.strikes, 62), self.limits.max_lockout_s)
                    st.locked_until = st.last_lockout_end = now + seconds
                    st.strikes += 1
                    attempt.lockouts.append(Lockout(k[0], k[1], seconds, len(st.failures)))
                    st.failures.clear()
            return attempt

    def succeeded(self, attempt: Attempt) -> None:
        """The attempt's password was right: forget the user name's failures and lockouts, and take this attempt
        back from the address's count (undoing a lockout it alone set off)."""
        if attempt.refused:
            return
        with self._lock:
            self._keys.pop(("user", attempt.user), None)
            k = ("address", attempt.address)
            st = self._keys.get(k)
            if st is None:
                return
            if k in attempt._undo:  # this attempt was the one that reached the limit: the others still count
                st.locked_until, st.strikes, st.last_lockout_end, before = attempt._undo[k]
                st.failures = deque(sorted([*before, *st.failures]))
            elif attempt.at in st.failures:
                st.failures.remove(attempt.at)
