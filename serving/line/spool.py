"""The spool: a durable FIFO of outgoing messages per sink, on local disk, so that no result is lost while a receiver
(the MES broker, a webhook) is down or the line service is killed.

One SQLite file in WAL mode (stdlib ``sqlite3``). A message is one row, written in its own transaction before
:meth:`Spool.put` returns, and deleted only by :meth:`Spool.ack`, which the publisher calls after the receiver
acknowledged it (an MQTT PUBACK, a webhook's 2xx). A process killed with SIGKILL, or a power cut, therefore leaves every
committed message in the file, and a restarted publisher replays what was not acknowledged: delivery is at-least-once,
and every message carries a transaction id (``txid``) that receivers de-duplicate on.

Order: ``seq`` is an ``AUTOINCREMENT`` key, so it only ever grows (never reused after an ack) and :meth:`Spool.peek`
returns a sink's messages in the order they were put. ``synchronous=FULL`` makes each commit durable on disk, not only
in the OS cache. One connection guarded by a lock serves all threads of a process; other processes may open the same
file (SQLite's locking, with a busy timeout).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    sink    TEXT    NOT NULL,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    txid    TEXT    NOT NULL,
    created REAL    NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_sink_txid ON messages (sink, txid);
CREATE INDEX IF NOT EXISTS messages_sink_seq ON messages (sink, seq);
"""


class SpoolError(RuntimeError):
    """The spool file cannot be opened or used; the message names the file and the fix."""


@dataclass(frozen=True)
class Message:
    """One spooled message: ``seq`` orders it within the spool, ``topic`` is what the sink resolves to a destination
    (a topic kind such as ``results``; see :func:`defectops.serving.line.sinks.topics`), ``txid`` is what receivers
    de-duplicate on, ``created`` the Unix time it was put."""

    seq: int
    sink: str
    topic: str
    payload: bytes
    txid: str
    created: float


class Spool:
    """A durable FIFO per sink in the SQLite file ``path`` (created with its folder if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode (isolation_level=None): every write below is one explicit transaction.
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                       check_same_thread=False)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode}, WAL needed (a local disk, not a share)")
            self._db.execute("PRAGMA synchronous=FULL")
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"schema version {version}, this release reads {SCHEMA_VERSION}")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as e:
            raise SpoolError(f"spool {self.path} cannot be opened ({e}): check the path is a writable local disk, or "
                             f"move a damaged file aside (its unacknowledged messages are then not replayed)") from e

    def put(self, sink: str, topic: str, payload: bytes, txid: str) -> int:
        """Append a message for ``sink`` and return its ``seq`` once it is committed to disk.

        Idempotent per (sink, txid) while the message is pending: putting the same txid again returns the pending
        message's seq (a producer that retries after a crash does not enqueue it twice); the same txid with another
        payload is refused (ValueError), since receivers would drop one of the two as a duplicate.
        """
        return self.put_many([sink], topic, payload, txid)[sink]

    def put_many(self, sinks: list[str], topic: str, payload: bytes, txid: str) -> dict[str, int]:
        """:meth:`put` for several sinks in one transaction (all or none are spooled); the seq per sink."""
        if not sinks or not all(sinks) or not topic or not txid:
            raise ValueError(f"spool {self.path}: sinks, topic and txid must be non-empty (got {sinks!r}, {topic!r}, "
                             f"{txid!r})")
        payload = bytes(payload)
        seqs: dict[str, int] = {}
        with self._lock, self._transaction():
            for sink in sinks:
                seqs[sink] = self._put(sink, topic, payload, txid)
        return seqs

    def _put(self, sink: str, topic: str, payload: bytes, txid: str) -> int:
        row = self._db.execute("SELECT seq, payload FROM messages WHERE sink = ? AND txid = ?",
                               (sink, txid)).fetchone()
        if row is not None:
            if bytes(row[1]) != payload:
                raise ValueError(f"spool {self.path}: txid {txid!r} is already pending for sink {sink!r} with "
                                 f"another payload; give each message its own transaction id")
            return int(row[0])
        cur = self._db.execute("INSERT INTO messages (sink, topic, payload, txid, created) VALUES (?, ?, ?, ?, ?)",
                               (sink, topic, payload, txid, time.time()))
        if cur.lastrowid is None:
            raise SpoolError(f"spool {self.path}: SQLite returned no row id for {txid!r}")
        return int(cur.lastrowid)

    def peek(self, sink: str, limit: int = 100) -> list[Message]:
        """The first ``limit`` pending messages of ``sink``, oldest first (nothing is removed)."""
        with self._lock:
            rows = self._query("SELECT seq, sink, topic, payload, txid, created FROM messages WHERE sink = ? "
                               "ORDER BY seq LIMIT ?", (sink, int(limit)))
        return [Message(int(r[0]), str(r[1]), str(r[2]), bytes(r[3]), str(r[4]), float(r[5])) for r in rows]

    def ack(self, sink: str, seq: int) -> None:
        """Remove message ``seq`` of ``sink``: its receiver acknowledged it. Acknowledging twice is harmless."""
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM messages WHERE sink = ? AND seq = ?", (sink, int(seq)))

    def pending(self, sink: str) -> int:
        """How many messages of ``sink`` wait for an acknowledgement."""
        with self._lock:
            return int(self._query("SELECT COUNT(*) FROM messages WHERE sink = ?", (sink,))[0][0])

    def sinks(self) -> list[str]:
        """The sinks that have pending messages, sorted."""
        with self._lock:
            return [str(r[0]) for r in self._query("SELECT DISTINCT sink FROM messages ORDER BY sink", ())]

    def check(self) -> None:
        """Run SQLite's integrity check; :class:`SpoolError` naming the file if it reports damage."""
        with self._lock:
            result = [str(r[0]) for r in self._query("PRAGMA integrity_check", ())]
        if result != ["ok"]:
            raise SpoolError(f"spool {self.path} is damaged ({'; '.join(result[:3])}): stop the service, move the file "
                             f"aside and recover what `sqlite3 {self.path} .recover` can read")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _query(self, sql: str, args: tuple[object, ...]) -> list[tuple[Any, ...]]:
        try:
            return list(self._db.execute(sql, args).fetchall())
        except sqlite3.Error as e:
            raise SpoolError(f"spool {self.path}: reading failed ({e})") from e

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self.path)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): the write lock is taken up front, so two processes
    writing the same spool wait for each other (busy timeout) instead of failing halfway."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._path = path

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise SpoolError(f"spool {self._path}: cannot start a write ({e}); another process may hold it") from e

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._db.execute("ROLLBACK")
                raise SpoolError(f"spool {self._path}: commit failed ({e}); the message was not spooled") from e
        else:
            self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise SpoolError(f"spool {self._path}: write failed ({exc}); nothing was changed") from exc
