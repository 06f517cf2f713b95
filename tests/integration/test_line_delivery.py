"""Durable, ordered delivery of inspection results to a real MQTT broker (Debian's mosquitto) and to a webhook.

What the MES sees is checked from the receiving side: a paho subscriber with QoS 1 and a persistent session collects
every message; delivery is at-least-once, so receivers de-duplicate on the txid, and each test shows that after that
the stream is exactly the one submitted, in order (duplicates before de-duplication are reported, never required to
be zero). The publishing process is killed with SIGKILL and the broker is stopped mid-stream; the spool is killed
during writes. Waits have generous deadlines that only guard against hangs; nothing asserts on time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from email.message import Message
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from mqtt_broker import HANG_GUARD_S, Collector, Mosquitto

from defectops.serving.line.publisher import Publisher
from defectops.serving.line.sinks import MqttSink, WebhookSink, topics, verify_signature
from defectops.serving.line.spool import Spool

SITE, LINE = "plant1", "smt3"
TOPICS = topics(SITE, LINE)
SCRIPT = Path(__file__).with_name("line_publisher_proc.py")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One mosquitto for the module (persistence off); tests that restart a broker start their own."""
    try:
        server = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
        server.start()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        server.kill()


def result(i: int) -> tuple[bytes, str]:
    txid = f"tx-{i:05d}"
    return json.dumps({"txid": txid, "n": i}).encode(), txid


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until true (a hang guard, not a timing assertion)."""
    idle = threading.Event()
    for _ in range(int(HANG_GUARD_S / 0.02)):
        if condition():
            return
        idle.wait(0.02)
    pytest.fail(f"{what} never happened")


def dedup(txids: list[str]) -> tuple[list[str], int]:
    """The stream as a receiver de-duplicating on txid sees it, and how many duplicates it dropped."""
    seen: set[str] = set()
    out = [t for t in txids if not (t in seen or seen.add(t))]  # type: ignore[func-returns-value]
    return out, len(txids) - len(out)


def test_stream_arrives_in_order_exactly_once_by_txid(broker: Mosquitto, tmp_path: Path) -> None:
    sub = Collector(broker.port, TOPICS.results)
    sink = MqttSink(broker.host, broker.port, client_id="defectops-stream", site=SITE, line=LINE, version="test")
    publisher = Publisher(Spool(tmp_path / "spool.db"), {"mes": sink}, backoff=(0.05, 0.5))
    publisher.start()
    try:
        expected = [result(i)[1] for i in range(200)]
        for i in range(200):
            publisher.submit("results", *result(i))
        assert publisher.flush(HANG_GUARD_S), publisher.stats()
        sub.wait_for_txids(expected)
        received, duplicates = dedup(sub.txids())
        assert received == expected
        assert duplicates == 0  # nothing was retried here, so not even at-least-once duplicates
        # the txid also travels as an MQTT 5 user property, beside the payload's
        assert all(dict(m.properties.UserProperty)["txid"] == json.loads(m.payload)["txid"] for m in sub.messages)
        stats = publisher.stats()["mes"]
        assert (stats.delivered, stats.pending, stats.last_error, stats.failing) == (200, 0, None, False)
    finally:
        publisher.stop(10)
        sink.close()
        sub.close()


def test_broker_outage_mid_stream_loses_nothing(tmp_path: Path) -> None:
    """Terminate the broker after 40 of 200 results have arrived, keep submitting, start it again on the same port:
    everything arrives, in order. The broker keeps sessions (persistence), as an MES broker does."""
    server = Mosquitto(tmp_path / "broker", persistence=True)
    server.start()
    sub = Collector(server.port, TOPICS.results)
    sink = MqttSink(server.host, server.port, client_id="defectops-outage", site=SITE, line=LINE, timeout=1.0,
                    reconnect_s=(1, 2), version="test")
    publisher = Publisher(Spool(tmp_path / "spool.db"), {"mes": sink}, backoff=(0.05, 0.5))
    publisher.start()
    try:
        expected = [result(i)[1] for i in range(200)]
        for i in range(100):
            publisher.submit("results", *result(i))
        sub.wait_until(lambda ms: len(ms) >= 40, "40 results before the outage")
        server.terminate()
        for i in range(100, 200):  # submitted while the broker is down: spooled
            publisher.submit("results", *result(i))
        assert publisher.stats()["mes"].pending > 0
        # the publisher notices: the head message fails (not connected) and is retried, later ones wait
        wait_for(lambda: publisher.stats()["mes"].retries > 0, "a failed delivery while the broker is down")
        server.start()
        assert publisher.flush(HANG_GUARD_S), publisher.stats()
        sub.wait_for_txids(expected)
        received, duplicates = dedup(sub.txids())
        assert received == expected, "after de-duplication on txid the stream is the submitted one, in order"
        stats = publisher.stats()["mes"]
        print(f"broker outage: {stats.retries} retries, {duplicates} duplicates dropped by txid")
    finally:
        publisher.stop(10)
        sink.close()
        sub.close()
        server.kill()


def test_broker_refusing_the_topic_is_permanent_and_loses_nothing(tmp_path: Path) -> None:
    """The broker's ACL refuses the results topic (PUBACK "Not authorized"): the sink is reported failing, nothing is
    dropped or skipped; once the ACL is fixed (and reloaded) everything is delivered, in order, without a restart."""
    status_only = f"topic readwrite {TOPICS.status}\ntopic read {SITE}/{LINE}/#\n"
    server = Mosquitto(tmp_path / "broker", acl=status_only)
    server.start()
    sub = Collector(server.port, TOPICS.results)
    sink = MqttSink(server.host, server.port, client_id="defectops-acl", site=SITE, line=LINE, version="test")
    publisher = Publisher(Spool(tmp_path / "spool.db"), {"mes": sink}, backoff=(0.05, 0.2))
    publisher.start()
    try:
        for i in range(20):
            publisher.submit("results", *result(i))
        wait_for(lambda: publisher.stats()["mes"].failing, "the sink reported failing")
        stats = publisher.stats()["mes"]
        assert "Not authorized" in (stats.last_error or "") and stats.pending == 20 and stats.delivered == 0
        server.set_acl(f"topic readwrite {SITE}/{LINE}/#\n")
        assert publisher.flush(HANG_GUARD_S), publisher.stats()
        expected = [result(i)[1] for i in range(20)]
        sub.wait_for_txids(expected)
        assert dedup(sub.txids())[0] == expected
        assert not publisher.stats()["mes"].failing
    finally:
        publisher.stop(10)
        sink.close()
        sub.close()
        server.kill()


def _start_script(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ.copy())


def _read_until(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdout is not None
    seen = []
    for out in proc.stdout:
        seen.append(out)
        if out.strip() == line:
            return
    pytest.fail(f"{SCRIPT.name} exited ({proc.wait()}) before printing {line!r}:\n{''.join(seen)[-3000:]}")


def test_publisher_killed_mid_stream_replays_from_the_spool(broker: Mosquitto, tmp_path: Path) -> None:
    spool_path = tmp_path / "spool.db"
    client_id = f"defectops-kill-{uuid.uuid4().hex[:6]}"
    sub = Collector(broker.port, TOPICS.results)
    try:
        first = _start_script("publish", spool_path, broker.port, client_id, 0, 200, 0.01)
        sub.wait_until(lambda ms: len(ms) >= 50, "50 results from the first process")
        first.kill()  # SIGKILL: no DISCONNECT, no flush, no cleanup
        first.wait()
        with Spool(spool_path) as spool:
            spool.check()
            left = spool.pending("mes")
        assert 0 < left < 200, "the process was killed mid-stream"
        second = _start_script("publish", spool_path, broker.port, client_id, 200, 50)
        out, _ = second.communicate(timeout=HANG_GUARD_S)
        assert second.returncode == 0 and "flushed" in out, out
        expected = [result(i)[1] for i in range(250)]
        sub.wait_for_txids(expected)
        received, duplicates = dedup(sub.txids())
        assert received == expected
        print(f"killed with {left} pending; {duplicates} duplicates dropped by txid")
        with Spool(spool_path) as spool:
            assert spool.pending("mes") == 0
    finally:
        sub.close()


def test_status_topic_is_retained_online_and_the_last_will_says_offline(broker: Mosquitto) -> None:
    client_id = f"defectops-status-{uuid.uuid4().hex[:6]}"
    proc = _start_script("hold", broker.port, client_id)
    try:
        _read_until(proc, "ready")
        late = Collector(broker.port, TOPICS.status)  # subscribes after the service went online
        late.wait_until(lambda ms: len(ms) >= 1, "the retained status")
        first = late.messages[0]
        assert first.retain
        assert json.loads(first.payload) == {"status": "online", "service": "defectops", "client_id": client_id,
                                             "version": "test-hold", "since": json.loads(first.payload)["since"]}
        proc.kill()  # SIGKILL: the broker sees the connection drop and publishes the Last Will
        proc.wait()
        late.wait_until(lambda ms: any(json.loads(m.payload)["status"] == "offline" for m in ms), "the Last Will")
        assert json.loads(late.messages[-1].payload) == {"status": "offline", "service": "defectops",
                                                         "client_id": client_id}
        late.close()
        later = Collector(broker.port, TOPICS.status)  # and it is retained for whoever comes next
        later.wait_until(lambda ms: len(ms) >= 1, "the retained status")
        assert later.messages[0].retain and json.loads(later.messages[0].payload)["status"] == "offline"
        later.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Hook:
    """A webhook receiver (http.server in a thread): answers ``fail_status`` to the first ``fail_first`` requests
    (and to every request while ``refuse`` is set), 200 otherwise, and records what it accepted."""

    def __init__(self, *, fail_first: int = 0, fail_status: int = 503) -> None:
        self.fail_first, self.fail_status = fail_first, fail_status
        self.refuse = threading.Event()
        self.requests = 0
        self.accepted: list[tuple[Message, bytes]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.requests += 1
                if hook.refuse.is_set() or hook.requests <= hook.fail_first:
                    self.send_response(hook.fail_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                hook.accepted.append((self.headers, body))  # case-insensitive, as HTTP headers are
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mes/results"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhook_retries_503_delivers_in_order_with_valid_signatures(tmp_path: Path) -> None:
    secret = b"shared-with-the-mes"
    hook = Hook(fail_first=5, fail_status=503)
    publisher = Publisher(Spool(tmp_path / "spool.db"), {"hook": WebhookSink(hook.url, secret, timeout=5)},
                          backoff=(0.01, 0.05))
    publisher.start()
    try:
        expected = [result(i)[1] for i in range(50)]
        for i in range(50):
            publisher.submit("results", *result(i))
        assert publisher.flush(HANG_GUARD_S), publisher.stats()
        assert [h["X-DefectOps-Transaction"] for h, _ in hook.accepted] == expected
        assert [json.loads(b)["txid"] for _, b in hook.accepted] == expected
        for headers, body in hook.accepted:
            assert headers["Content-Type"] == "application/json" and headers["X-DefectOps-Topic"] == "results"
            assert verify_signature(secret, body, headers["X-DefectOps-Timestamp"], headers["X-DefectOps-Signature"])
        headers, body = hook.accepted[0]
        ts, sig = headers["X-DefectOps-Timestamp"], headers["X-DefectOps-Signature"]
        assert not verify_signature(secret, body.replace(b'"n": 0', b'"n": 9'), ts, sig), "a tampered body fails"
        assert not verify_signature(b"another secret", body, ts, sig)
        assert not verify_signature(secret, body, str(int(ts) - 3600), sig), "another timestamp fails"
        assert not verify_signature(secret, body, ts, sig, now=int(ts) + 301), "an old request fails (replay)"
        stats = publisher.stats()["hook"]
        assert (stats.delivered, stats.retries, stats.pending, stats.failing) == (50, 5, 0, False)
    finally:
        publisher.stop(10)
        hook.close()


def test_webhook_permanent_failure_keeps_everything_until_fixed(tmp_path: Path) -> None:
    """A 403 is permanent: nothing is dropped, the sink is reported failing, and once the receiver accepts again
    everything is delivered in order."""
    hook = Hook(fail_status=403)
    hook.refuse.set()
    publisher = Publisher(Spool(tmp_path / "spool.db"), {"hook": WebhookSink(hook.url, b"s", timeout=5)},
                          backoff=(0.01, 0.05))
    publisher.start()
    try:
        for i in range(20):
            publisher.submit("results", *result(i))
        wait_for(lambda: publisher.stats()["hook"].failing, "the sink reported failing")
        stats = publisher.stats()["hook"]
        assert stats.failing and "HTTP 403" in (stats.last_error or "") and stats.pending == 20
        assert stats.delivered == 0 and hook.accepted == []
        hook.refuse.clear()
        assert publisher.flush(HANG_GUARD_S), publisher.stats()
        assert [json.loads(b)["txid"] for _, b in hook.accepted] == [result(i)[1] for i in range(20)]
        assert not publisher.stats()["hook"].failing
    finally:
        publisher.stop(10)
        hook.close()


def test_spool_survives_sigkill_during_writes(tmp_path: Path) -> None:
    spool_path = tmp_path / "spool.db"
    proc = _start_script("spool-writes", spool_path)
    committed: list[tuple[int, str]] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # each line is printed after its commit returned
        seq, txid = line.split()
        committed.append((int(seq), txid))
        if len(committed) >= 300:
            break
    os.kill(proc.pid, signal.SIGKILL)  # while it keeps writing
    proc.wait()
    assert len(committed) >= 300, f"{SCRIPT.name} spool-writes stopped early (exit {proc.returncode})"
    with Spool(spool_path) as spool:
        spool.check()  # SQLite's integrity check: no corrupt file
        rows = spool.peek("mes", limit=100_000)
        on_disk = [(m.seq, m.txid) for m in rows]
        assert on_disk[: len(committed)] == committed, "every committed message is there, in order"
        assert [m.seq for m in rows] == sorted(m.seq for m in rows)
        assert all(json.loads(m.payload)["txid"] == m.txid for m in rows)
        # still usable: the next put continues after the last committed seq
        assert spool.put("mes", "results", b"{}", "after-kill") > on_disk[-1][0]
