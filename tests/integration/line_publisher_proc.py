"""A publishing process for tests/integration/test_line_delivery.py, killed with SIGKILL by the tests.

    python line_publisher_proc.py publish SPOOL PORT CLIENT_ID START COUNT [DELAY_S]
        spool and deliver results tx-<START>..tx-<START+COUNT-1> to the broker (sink ``mes``, site/line
        ``plant1/smt3``), each delivery slowed by DELAY_S; prints "flushed" and exits 0 once the spool is empty
    python line_publisher_proc.py hold PORT CLIENT_ID
        connect (the retained status turns online), print "ready" and stay connected until killed
    python line_publisher_proc.py spool-writes SPOOL
        put messages into the spool forever, printing each seq once it is committed
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from defectops.serving.line.publisher import Publisher
from defectops.serving.line.sinks import MqttSink
from defectops.serving.line.spool import Message, Spool

SITE, LINE = "plant1", "smt3"


class SlowSink:
    """Delays each delivery so that a test can kill the process while the stream is still being delivered."""

    def __init__(self, sink: MqttSink, delay_s: float) -> None:
        self.sink, self.delay_s = sink, delay_s

    def send(self, msg: Message) -> None:
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        self.sink.send(msg)


def publish(spool_path: Path, port: int, client_id: str, start: int, count: int, delay_s: float) -> int:
    spool = Spool(spool_path)
    sink = MqttSink("127.0.0.1", port, client_id=client_id, site=SITE, line=LINE, timeout=10.0, version="test")
    if not sink.wait_connected(30):
        print(f"not connected to 127.0.0.1:{port}", flush=True)
        return 2
    print("ready", flush=True)
    publisher = Publisher(spool, {"mes": SlowSink(sink, delay_s)}, backoff=(0.05, 0.5))
    publisher.start()
    for i in range(start, start + count):
        txid = f"tx-{i:05d}"
        publisher.submit("results", json.dumps({"txid": txid, "n": i}).encode(), txid)
    print("submitted", flush=True)
    ok = publisher.flush(120)
    publisher.stop(10)
    sink.close()
    print("flushed" if ok else "not flushed", flush=True)
    return 0 if ok else 1


def hold(port: int, client_id: str) -> int:
    """Connect (the status topic turns online), then stay connected until killed."""
    sink = MqttSink("127.0.0.1", port, client_id=client_id, site=SITE, line=LINE, version="test-hold")
    if not sink.wait_connected(30):
        print(f"not connected to 127.0.0.1:{port}", flush=True)
        return 2
    print("ready", flush=True)
    threading.Event().wait()
    return 0


def spool_writes(spool_path: Path) -> int:
    spool = Spool(spool_path)
    i = 0
    while True:
        txid = f"tx-{i:07d}"
        seq = spool.put("mes", "results", json.dumps({"txid": txid, "n": i, "pad": "x" * 200}).encode(), txid)
        print(f"{seq} {txid}", flush=True)
        i += 1


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "publish":
        delay = float(args[5]) if len(args) > 5 else 0.0
        sys.exit(publish(Path(args[0]), int(args[1]), args[2], int(args[3]), int(args[4]), delay))
    if cmd == "hold":
        sys.exit(hold(int(args[0]), args[1]))
    if cmd == "spool-writes":
        sys.exit(spool_writes(Path(args[0])))
    sys.exit(f"unknown command {cmd!r}: publish, hold or spool-writes")
