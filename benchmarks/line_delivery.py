"""Throughput of the line's result delivery: spool writes (one durable commit each), and results/s through the
publisher into a local mosquitto with QoS 1 (each message waits for its PUBACK before the next: the price of strict
order), beside paho alone doing the same (publish, wait for PUBACK) without the spool.

Starts its own mosquitto on a free loopback port (Debian's /usr/sbin/mosquitto), unless --port names a running one.

    .venv/bin/python benchmarks/line_delivery.py --messages 2000
"""

from __future__ import annotations

import argparse
import getpass
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from defectops.serving.line.publisher import Publisher
from defectops.serving.line.sinks import MqttSink
from defectops.serving.line.spool import Spool


def start_broker(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    conf = work / "mosquitto.conf"
    # `user`: run as ourselves (as root, mosquitto would switch to the `mosquitto` user)
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser {getpass.getuser()}\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"mosquitto ({binary}) did not listen on 127.0.0.1:{port}: install it (apt-get install mosquitto)")


def payload(i: int) -> tuple[bytes, str]:
    txid = f"bench-{i:07d}"
    return json.dumps({"txid": txid, "board": f"B{i:07d}", "verdict": "pass", "defects": []}).encode(), txid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--port", type=int, default=0, help="a running broker on 127.0.0.1 (default: start one)")
    args = ap.parse_args()
    n = args.messages
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        proc, port = (None, args.port) if args.port else start_broker(work)
        try:
            spool = Spool(work / "spool.db")
            t0 = time.perf_counter()
            for i in range(n):
                spool.put("mes", "results", *payload(i))
            put_s = time.perf_counter() - t0
            print(f"spool put (durable commit each): {n / put_s:,.0f} messages/s")

            sink = MqttSink("127.0.0.1", port, client_id="bench-publisher", site="plant1", line="smt3",
                            version="bench")
            assert sink.wait_connected(30), "not connected"
            pub = Publisher(spool, {"mes": sink})
            t0 = time.perf_counter()
            pub.start()
            assert pub.flush(600), pub.stats()
            drain_s = time.perf_counter() - t0
            print(f"publisher -> mosquitto, QoS 1, PUBACK per message, spool ack each: {n / drain_s:,.0f} messages/s")
            pub.stop()
            sink.close()

            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw",
                                 protocol=MQTTProtocolVersion.MQTTv5)
            connected = threading.Event()
            client.on_connect = lambda *a: connected.set()
            client.connect("127.0.0.1", port)
            client.loop_start()
            connected.wait(30)
            t0 = time.perf_counter()
            for i in range(n):
                client.publish("plant1/smt3/inspection/raw", payload(i)[0], qos=1).wait_for_publish(10)
            raw_s = time.perf_counter() - t0
            print(f"paho alone, QoS 1, PUBACK per message (no spool): {n / raw_s:,.0f} messages/s")
            client.disconnect()
            client.loop_stop()
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait()


if __name__ == "__main__":
    main()
