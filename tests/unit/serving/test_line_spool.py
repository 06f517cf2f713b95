"""The line's spool, topic layout, webhook signatures and publisher ordering, without a broker (fakes for sinks, a
local HTTP server for the webhook's status handling)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from defectops.serving.line.publisher import Publisher
from defectops.serving.line.sinks import DeliveryError, check_kind, sign, topics, verify_signature
from defectops.serving.line.spool import Message, Spool, SpoolError


def test_spool_fifo_per_sink_ack_and_seq_never_reused(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        a = [spool.put("mes", "results", f"{i}".encode(), f"tx{i}") for i in range(5)]
        b = spool.put("hook", "alarms", b"x", "tx0")  # the same txid in another sink's queue is its own message
        assert a == sorted(a) and b > a[-1]
        assert [m.txid for m in spool.peek("mes", 3)] == ["tx0", "tx1", "tx2"]
        assert spool.pending("mes") == 5 and spool.pending("hook") == 1 and spool.sinks() == ["hook", "mes"]
        for seq in a:
            spool.ack("mes", seq)
        spool.ack("mes", a[0])  # twice: harmless
        assert spool.pending("mes") == 0 and spool.peek("mes") == []
        assert spool.put("mes", "results", b"new", "tx9") > b  # AUTOINCREMENT: never reuses an acked seq
        m = spool.peek("hook")[0]
        assert (m.sink, m.topic, m.payload, m.txid) == ("hook", "alarms", b"x", "tx0") and m.created > 0
    with Spool(tmp_path / "s.db") as again:  # durable: reopened
        assert [m.txid for m in again.peek("mes")] == ["tx9"]
        again.check()


def test_put_is_idempotent_per_pending_txid(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        seq = spool.put("mes", "results", b"p", "tx")
        assert spool.put("mes", "results", b"p", "tx") == seq and spool.pending("mes") == 1
        with pytest.raises(ValueError, match="already pending"):
            spool.put("mes", "results", b"other", "tx")
        with pytest.raises(ValueError, match="non-empty"):
            spool.put("mes", "results", b"p", "")
        assert spool.put_many(["mes", "hook"], "results", b"q", "tq").keys() == {"mes", "hook"}


def test_spool_is_safe_across_threads(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        def writer(k: int) -> None:
            for i in range(25):
                spool.put("mes", "results", b"{}", f"t{k}-{i}")

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rows = spool.peek("mes", 1000)
        assert len(rows) == 100 and [m.seq for m in rows] == sorted(m.seq for m in rows)


def test_a_file_that_is_not_a_spool_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "spool.db"
    bad.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(SpoolError, match=r"spool .*spool.db cannot be opened .*move a damaged file aside"):
        Spool(bad)


def test_topic_layout_and_kinds() -> None:
    t = topics("plant1", "smt3")
    assert (t.results, t.alarms, t.status) == ("plant1/smt3/inspection/results", "plant1/smt3/inspection/alarms",
                                               "plant1/smt3/inspection/status")
    assert t.cfx("CFX.Production.Assurance.UnitsInspected") == "plant1/smt3/cfx/CFX.Production.Assurance.UnitsInspected"
    assert t.for_kind("cfx/UnitsInspected") == "plant1/smt3/cfx/UnitsInspected"
    assert t.for_kind("alarms") == t.alarms
    for bad_site in ("", "a/b", "+", "#"):
        with pytest.raises(ValueError, match="topic level site"):
            topics(bad_site, "smt3")
    with pytest.raises(ValueError, match="unknown topic kind 'result'"):
        check_kind("result")
    with pytest.raises(ValueError, match="CFX message name"):
        check_kind("cfx/a/b")


def test_signature_scheme() -> None:
    secret, body, ts = b"k", b'{"txid": "t"}', "1700000000"
    sig = sign(secret, ts, body)
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert verify_signature(secret, body, ts, sig, now=1700000010)
    assert not verify_signature(secret, body + b" ", ts, sig, now=1700000010)
    assert not verify_signature(secret, body, ts, sig, max_age_s=5, now=1700000010)
    assert not verify_signature(secret, body, "not-a-number", sig, now=1700000010)
    assert not verify_signature(secret, body, ts, "", now=1700000010)


class FlakySink:
    """Fails each message's first ``fails`` attempts, records what it accepted."""

    def __init__(self, fails: int, *, permanent: bool = False) -> None:
        self.fails, self.permanent = fails, permanent
        self.attempts: dict[str, int] = {}
        self.got: list[str] = []

    def send(self, msg: Message) -> None:
        n = self.attempts[msg.txid] = self.attempts.get(msg.txid, 0) + 1
        if n <= self.fails:
            raise DeliveryError(f"attempt {n} of {msg.txid}", permanent=self.permanent)
        self.got.append(msg.txid)


def test_publisher_keeps_order_per_sink_and_counts(tmp_path: Path) -> None:
    flaky, fine = FlakySink(2), FlakySink(0)
    with Spool(tmp_path / "s.db") as spool:
        pub = Publisher(spool, {"flaky": flaky, "fine": fine}, backoff=(0.001, 0.002))
        for i in range(10):
            assert pub.submit("results", b"{}", f"t{i}").keys() == {"flaky", "fine"}
        pub.start()
        assert pub.flush(60)
        assert pub.stop(10)
        want = [f"t{i}" for i in range(10)]
        assert flaky.got == want and fine.got == want
        stats = pub.stats()
        assert (stats["flaky"].delivered, stats["flaky"].retries, stats["flaky"].pending) == (10, 20, 0)
        assert (stats["fine"].delivered, stats["fine"].retries, stats["fine"].last_error) == (10, 0, None)
        with pytest.raises(ValueError, match="unknown topic kind"):
            pub.submit("nope", b"{}", "t")


def test_publisher_arguments_are_checked(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        with pytest.raises(ValueError, match="at least one sink"):
            Publisher(spool, {})
        with pytest.raises(ValueError, match="backoff"):
            Publisher(spool, {"x": FlakySink(0)}, backoff=(2.0, 1.0))
