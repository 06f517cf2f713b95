"""The publisher: drains the spool into the sinks, one daemon thread per sink, strictly in order.

Each sink's thread takes the oldest pending message of its queue, calls ``sink.send`` until it returns (retrying with
exponential back-off and jitter, the receiver's ``Retry-After`` honoured), then acknowledges it in the spool and takes
the next one: a message is never overtaken by a later one, and one slow receiver never holds up another sink. A
permanent failure (:class:`~defectops.serving.line.sinks.DeliveryError` with ``permanent``, e.g. a webhook's 403)
does not drop the message: it stays at the head, the sink is reported ``failing`` (logged as an error, visible in
:meth:`Publisher.stats`) and it is retried at the longest back-off until the cause is fixed. Later messages wait in
the spool, so fixing the receiver delivers everything, in order.

Counters per sink (:class:`SinkStats`: delivered, retries, pending, last_error, failing) are what the line service
exports as metrics.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from defectops.serving.line.sinks import DeliveryError, Sink, check_kind
from defectops.serving.line.spool import Message, Spool, SpoolError

log = logging.getLogger(__name__)

IDLE_POLL_S = 1.0  # an idle sink looks at the spool this often (messages put by another process on the same file)
BATCH = 100


@dataclass(frozen=True)
class SinkStats:
    """One sink's counters: messages ``delivered`` (acknowledged) and failed attempts (``retries``) since start,
    ``pending`` in the spool, the ``last_error`` (None once a delivery succeeds again), ``failing`` while the head
    message failed permanently, and ``last_delivery`` (Unix time)."""

    delivered: int = 0
    retries: int = 0
    pending: int = 0
    last_error: str | None = None
    failing: bool = False
    last_delivery: float | None = None


class Publisher:
    """Delivers ``spool``'s messages to ``sinks`` (name -> sink; the name is the spool's queue) in order.

    ``backoff`` = (first, longest) delay in seconds between retries of a message.
    """

    def __init__(self, spool: Spool, sinks: Mapping[str, Sink], *, backoff: tuple[float, float] = (0.5, 30.0),
                 batch: int = BATCH, idle_poll_s: float = IDLE_POLL_S) -> None:
        if not sinks:
            raise ValueError("Publisher needs at least one sink: configure an MQTT broker or a webhook")
        first, longest = backoff
        if not 0 < first <= longest:
            raise ValueError(f"backoff={backoff}: need 0 < first <= longest seconds")
        self.spool = spool
        self.sinks = dict(sinks)
        self.backoff = (float(first), float(longest))
        self._batch, self._idle_poll_s = int(batch), float(idle_poll_s)
        self._stop = threading.Event()
        self._wake = {name: threading.Event() for name in self.sinks}
        self._acked = threading.Condition()
        self._stats = {name: SinkStats() for name in self.sinks}
        self._stats_lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._rng = random.Random()

    # --- producer side -------------------------------------------------------------------------------------------
    def submit(self, topic_kind: str, payload: bytes, txid: str, *, only: Sequence[str] | None = None
               ) -> dict[str, int]:
        """Spool one message for every sink (or the sinks named in ``only``; one transaction: all or none) and wake
        their threads; returns the seq per sink. ``topic_kind`` is ``results``, ``alarms`` or ``cfx/<MessageName>``."""
        check_kind(topic_kind)
        names = [n for n in self.sinks if only is None or n in only]
        seqs = self.spool.put_many(names, topic_kind, payload, txid) if names else {}
        for name in names:
            self._wake[name].set()
        return seqs

    # --- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start one daemon thread per sink (what the spool holds from a previous run is delivered first)."""
        if self._threads:
            raise RuntimeError("Publisher already started; create a new one after stop()")
        for name, sink in self.sinks.items():
            t = threading.Thread(target=self._run, args=(name, sink), name=f"defectops-line-{name}", daemon=True)
            self._threads[name] = t
            t.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the threads (a message being sent is finished or left in the spool); whether all stopped in time.
        The sinks are not closed: their owner closes them."""
        self._stop.set()
        for ev in self._wake.values():
            ev.set()
        deadline = time.monotonic() + timeout
        for t in self._threads.values():
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads.values())

    def flush(self, timeout: float) -> bool:
        """Wait until every sink's queue is empty; False if something is still pending after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._acked:
            while any(self.spool.pending(name) for name in self.sinks):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._acked.wait(min(remaining, self._idle_poll_s))
        return True

    def stats(self) -> dict[str, SinkStats]:
        """A snapshot of every sink's counters, ``pending`` read from the spool."""
        with self._stats_lock:
            snap = dict(self._stats)
        return {name: replace(s, pending=self.spool.pending(name)) for name, s in snap.items()}

    # --- one thread per sink -------------------------------------------------------------------------------------
    def _run(self, name: str, sink: Sink) -> None:
        wake = self._wake[name]
        while not self._stop.is_set():
            try:
                wake.clear()
                batch = self.spool.peek(name, self._batch)
                if not batch:
                    wake.wait(self._idle_poll_s)
                    continue
                for msg in batch:
                    if not self._deliver(name, sink, msg):
                        return
            except SpoolError as e:  # a full or unreadable disk: nothing is lost while it lasts; try again later
                self._note(name, retries=0, error=str(e), failing=False)
                log.error("sink %s: %s", name, e)
                self._stop.wait(self.backoff[1])

    def _deliver(self, name: str, sink: Sink, msg: Message) -> bool:
        """Send ``msg`` until acknowledged, then ack it in the spool; False if stopped first (it stays spooled)."""
        attempt = 0
        while not self._stop.is_set():
            try:
                sink.send(msg)
            except DeliveryError as e:
                error = e
            except Exception as e:  # a sink's bug must not end its thread: logged with its traceback, counted, retried
                error = DeliveryError(f"sink {name}: {type(e).__name__}: {e}")
                log.exception("sink %s raised on %s", name, msg.txid)
            else:
                self.spool.ack(name, msg.seq)
                self._delivered(name, attempt)
                return True
            attempt += 1
            self._failed(name, msg, error, attempt)
            if self._stop.wait(self._delay(attempt, error)):
                break
        return False

    def _delay(self, attempt: int, error: DeliveryError) -> float:
        first, longest = self.backoff
        if error.permanent:
            return longest
        delay = min(longest, first * 2 ** min(attempt - 1, 32))
        delay = self._rng.uniform(delay / 2, delay)  # jitter: receivers coming back are not hit by every line at once
        if error.retry_after is not None:
            delay = max(delay, min(error.retry_after, longest))
        return delay

    def _delivered(self, name: str, attempts: int) -> None:
        with self._stats_lock:
            s = self._stats[name]
            if s.last_error is not None:
                log.info("sink %s delivering again after %d retries (last error: %s)", name, attempts, s.last_error)
            self._stats[name] = replace(s, delivered=s.delivered + 1, last_error=None, failing=False,
                                        last_delivery=time.time())
        with self._acked:
            self._acked.notify_all()

    def _failed(self, name: str, msg: Message, error: DeliveryError, attempt: int) -> None:
        with self._stats_lock:
            before = self._stats[name]
        self._note(name, retries=1, error=str(error), failing=error.permanent)
        if error.permanent and not before.failing:
            log.error("sink %s failing: %s (message %s and the %d after it stay in the spool)", name, error,
                      msg.txid, max(0, self.spool.pending(name) - 1))
        elif attempt == 1 or str(error) != before.last_error:
            log.warning("sink %s: %s", name, error)
        else:
            log.debug("sink %s: attempt %d: %s", name, attempt, error)

    def _note(self, name: str, *, retries: int, error: str, failing: bool) -> None:
        with self._stats_lock:
            s = self._stats[name]
            self._stats[name] = replace(s, retries=s.retries + retries, last_error=error, failing=failing)
