"""A real MQTT broker for the line-delivery tests: Debian's ``mosquitto`` on a free loopback port with a generated
config, in its own process group; it can be terminated and started again on the same port (a broker outage).

``persistence=True`` keeps sessions and queued messages across a restart (what an MES broker does; without it a
restarted broker forgets the subscribers' sessions, and what arrives before they are back is delivered to no one).
``acl`` restricts what anonymous clients may publish (a broker refusing a topic), reloaded by :meth:`Mosquitto.set_acl`.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from health import wait_until_ready
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

CANDIDATES = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto")


def find_mosquitto() -> str:
    """The mosquitto binary, or RuntimeError naming the fix."""
    found = shutil.which("mosquitto") or next((p for p in CANDIDATES if os.access(p, os.X_OK)), None)
    if found is None:
        raise RuntimeError("mosquitto not found (looked on PATH and in /usr/sbin): `apt-get install mosquitto`")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Mosquitto:
    """``mosquitto -c <workdir>/mosquitto.conf`` listening on 127.0.0.1:``port`` (anonymous, tests only)."""

    def __init__(self, workdir: Path, *, persistence: bool = False, acl: str | None = None) -> None:
        self.binary = find_mosquitto()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = "127.0.0.1"
        self.log = self.workdir / "mosquitto.log"
        self.config = self.workdir / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 # run as ourselves (as root, mosquitto would switch to the `mosquitto` user and lose the work dir)
                 f"user {getpass.getuser()}",
                 "log_dest stderr", "log_type error", "log_type warning", "log_type notice",
                 f"persistence {'true' if persistence else 'false'}"]
        if persistence:
            lines.append(f"persistence_location {self.workdir}/")
        self.acl = self.workdir / "acl"
        if acl is not None:  # rules for anonymous clients (mosquitto's acl_file format); change with set_acl()
            self.acl.write_text(acl)
            lines.append(f"acl_file {self.acl}")
        self.config.write_text("\n".join(lines) + "\n")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen([self.binary, "-c", str(self.config)], cwd=self.workdir, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        proc = self._proc
        wait_until_ready(f"mosquitto on port {self.port}", lambda: _accepts(self.port),
                         alive=lambda: proc.poll() is None, log=self.log, timeout=30, interval=0.05)

    def set_acl(self, acl: str) -> None:
        """Rewrite the ACL file and have the running broker reload it (SIGHUP)."""
        self.acl.write_text(acl)
        if self._proc is not None:
            self._proc.send_signal(signal.SIGHUP)

    def terminate(self) -> None:
        """SIGTERM and wait: a clean broker shutdown (with persistence, sessions and queues are saved)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(timeout=30)
        self._proc = None

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._proc = None

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()


HANG_GUARD_S = 60.0  # deadlines only stop a broken test from hanging; none of them is a timing assertion


class Collector:
    """A paho subscriber (MQTT 5, QoS 1, persistent session: clean_start False, session expiry 1 h) that records
    every message of ``topic`` and re-subscribes when the broker lost its session; ``key`` names the payload's
    transaction id."""

    def __init__(self, port: int, topic: str, client_id: str | None = None, key: str = "txid") -> None:
        self.topic, self.key = topic, key
        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"mes-{uuid.uuid4().hex[:8]}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect_async("127.0.0.1", port, keepalive=30, clean_start=False, properties=props)
        self.client.loop_start()
        assert self._subscribed.wait(HANG_GUARD_S), f"subscriber did not subscribe to {topic}"

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags, rc: Any, props: Any) -> None:
        if not flags.session_present:
            client.subscribe(self.topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def wait_until(self, done: Callable[[list[mqtt.MQTTMessage]], bool], what: str) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: done(self.messages), HANG_GUARD_S), (
                f"subscriber of {self.topic}: {what} never happened; got {len(self.messages)} messages")

    def txids(self) -> list[str]:
        with self._cond:
            return [json.loads(m.payload)[self.key] for m in self.messages]

    def wait_for_txids(self, expected: list[str]) -> None:
        want = set(expected)
        self.wait_until(lambda ms: want <= {json.loads(m.payload)[self.key] for m in ms}, f"all {len(want)} txids")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
