"""Sinks: where spooled messages go (the MES broker over MQTT, HTTP webhooks), each acknowledging one message at a time.

A sink's :meth:`Sink.send` returns only once the receiver acknowledged the message (an MQTT PUBACK for QoS 1, a
webhook's 2xx) and raises :class:`DeliveryError` otherwise; the publisher (``publisher.py``) removes a message from the
spool only after ``send`` returned, and retries the same message until it does. Delivery is therefore at-least-once:
a receiver may see a message twice (an acknowledgement lost on the way back, a publisher killed between PUBACK and the
spool's ack) and de-duplicates on its transaction id (``txid``), which every message carries.

Topics: a spooled message names a *topic kind*, which each sink resolves: ``results``, ``alarms`` or
``cfx/<MessageName>`` (IPC-CFX, e.g. ``cfx/CFX.Production.Assurance.UnitsInspected``). For MQTT they are
``<site>/<line>/inspection/results``, ``<site>/<line>/inspection/alarms`` and ``<site>/<line>/cfx/<MessageName>``
(:func:`topics`); the retained ``<site>/<line>/inspection/status`` says whether the service is online (set on every
connect, the Last Will sets it offline). Webhooks get the kind in the ``X-DefectOps-Topic`` header.

Webhook signature: ``X-DefectOps-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`` with the Unix
time of ``X-DefectOps-Timestamp``; receivers check it with :func:`verify_signature` (the timestamp bounds replays).
docs/line.md has the topic layout, the guarantees and a receiver example.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.metadata
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from defectops.serving.line.spool import Message

log = logging.getLogger(__name__)

KIND_RESULTS = "results"
KIND_ALARMS = "alarms"
KIND_CFX_PREFIX = "cfx/"
SIGNATURE_PREFIX = "sha256="
HEADER_TRANSACTION = "X-DefectOps-Transaction"
HEADER_TIMESTAMP = "X-DefectOps-Timestamp"
HEADER_SIGNATURE = "X-DefectOps-Signature"
HEADER_TOPIC = "X-DefectOps-Topic"
# HTTP statuses that say "later" rather than "never": timeout and rate limit (every 5xx is retried too).
RETRYABLE_4XX = frozenset({408, 429})


class DeliveryError(RuntimeError):
    """A message was not acknowledged. ``permanent`` marks failures that retrying alone will not fix (a 4xx of a
    webhook, a broker refusing the topic): the message stays in the spool and the sink is reported failing until
    someone fixes the cause. ``retry_after`` is the receiver's own hint in seconds (HTTP ``Retry-After``)."""

    def __init__(self, message: str, *, permanent: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after


class Sink(Protocol):
    """Delivers one message and returns once the receiver acknowledged it; raises :class:`DeliveryError` if not."""

    def send(self, msg: Message) -> None: ...


def _check_level(what: str, value: str) -> str:
    if not value or any(c in value for c in "/+#\0"):
        raise ValueError(f"MQTT topic level {what}={value!r} must be non-empty without '/', '+', '#' or NUL: "
                         f"use the plant's short site and line names (e.g. site=plant1 line=smt3)")
    return value


def check_kind(kind: str) -> str:
    """``kind`` if it is a topic kind sinks know (``results``, ``alarms``, ``cfx/<MessageName>``), else ValueError."""
    if kind in (KIND_RESULTS, KIND_ALARMS):
        return kind
    if kind.startswith(KIND_CFX_PREFIX):
        _check_level("CFX message name", kind[len(KIND_CFX_PREFIX):])
        return kind
    raise ValueError(f"unknown topic kind {kind!r}: use {KIND_RESULTS!r}, {KIND_ALARMS!r} or "
                     f"'{KIND_CFX_PREFIX}<MessageName>'")


@dataclass(frozen=True)
class LineTopics:
    """The MQTT topics of one line: ``results``, ``alarms``, ``status`` (retained), ``cfx(<MessageName>)`` and, inbound,
    ``verdicts``."""

    site: str
    line: str

    @property
    def base(self) -> str:
        return f"{self.site}/{self.line}"

    @property
    def results(self) -> str:
        return f"{self.base}/inspection/results"

    @property
    def alarms(self) -> str:
        return f"{self.base}/inspection/alarms"

    @property
    def status(self) -> str:
        return f"{self.base}/inspection/status"

    @property
    def verdicts(self) -> str:
        """Where a repair station publishes its verifications (the service subscribes)."""
        return f"{self.base}/repair/verdicts"

    def cfx(self, message_name: str) -> str:
        return f"{self.base}/cfx/{_check_level('CFX message name', message_name)}"

    def for_kind(self, kind: str) -> str:
        """The topic a message of topic kind ``kind`` is published to."""
        kind = check_kind(kind)
        if kind == KIND_RESULTS:
            return self.results
        if kind == KIND_ALARMS:
            return self.alarms
        return self.cfx(kind[len(KIND_CFX_PREFIX):])


def topics(site: str, line: str) -> LineTopics:
    """The topic layout of ``<site>/<line>`` (each a single topic level, checked)."""
    return LineTopics(_check_level("site", site), _check_level("line", line))


def service_version() -> str:
    """The installed ``defectops`` version (what the status topic announces)."""
    try:
        return importlib.metadata.version("defectops")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class MqttSink:
    """Publishes to an MQTT broker (MQTT 5, paho-mqtt v2) with QoS 1 and waits for the broker's PUBACK.

    The session is persistent (a stable ``client_id``, ``clean_start`` False, a session expiry of
    ``session_expiry_s``), so QoS 1 messages in flight at a disconnect are resent on reconnect. paho's network thread
    reconnects with exponential back-off (``reconnect_s`` = (first, max) seconds). On each connect the retained
    ``<site>/<line>/inspection/status`` is set to ``{"status": "online", "version": ...}``; the Last Will (retained,
    QoS 1) sets it to ``{"status": "offline", ...}`` when the connection drops without a DISCONNECT (a killed process,
    a pulled cable), and :meth:`close` sets it before disconnecting. Each message carries its txid as the MQTT 5 user
    property ``txid`` (receivers on MQTT 3.1.1 read it from the payload, which the line service's messages carry).
    """

    def __init__(self, host: str, port: int, *, client_id: str, site: str, line: str, username: str | None = None,
                 password: str | None = None, tls: ssl.SSLContext | None = None, timeout: float = 10.0,
                 keepalive: int = 30, session_expiry_s: int = 24 * 3600, reconnect_s: tuple[int, int] = (1, 30),
                 version: str | None = None) -> None:
        if not client_id:
            raise ValueError("MqttSink needs a stable, non-empty client_id (e.g. defectops-<site>-<line>): the "
                             "broker keeps the persistent session under it")
        self.host, self.port, self.client_id, self.timeout = host, int(port), client_id, float(timeout)
        self.topics = topics(site, line)
        self.version = version or service_version()
        self._connected = threading.Event()
        self._last_error: str | None = None
        self._status_mid: int | None = None
        self._refused: dict[int, ReasonCode] = {}
        self._refused_lock = threading.Lock()

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
        c.will_set(self.topics.status, self._status_payload("offline"), qos=1, retain=True)
        if username is not None:
            c.username_pw_set(username, password)
        if tls is not None:
            c.tls_set_context(tls)
        c.reconnect_delay_set(*reconnect_s)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = int(session_expiry_s)
        c.connect_async(host, self.port, keepalive=keepalive, clean_start=False, properties=props)
        c.loop_start()
        self._client = c

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Whether the sink is connected (the broker acknowledged the retained "online"), waiting up to ``timeout``
        s for it."""
        return self._connected.wait(timeout)

    def send(self, msg: Message) -> None:
        where = f"MQTT broker {self.host}:{self.port}"
        if not self._connected.wait(self.timeout):
            why = f" ({self._last_error})" if self._last_error else ""
            raise DeliveryError(f"{where} not connected{why}: kept in the spool, retried until the broker is back")
        topic = self.topics.for_kind(msg.topic)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = [("txid", msg.txid)]
        info = self._client.publish(topic, msg.payload, qos=1, retain=False, properties=props)
        try:
            info.wait_for_publish(self.timeout)
        except (RuntimeError, ValueError) as e:  # not sent now (disconnected, queue full): paho may still send it
            raise DeliveryError(f"{where}: publish of {msg.txid} to {topic} failed ({e}); retried") from e
        if not info.is_published():
            raise DeliveryError(f"{where}: no PUBACK for {msg.txid} on {topic} within {self.timeout:.0f} s; retried")
        with self._refused_lock:
            refused = self._refused.pop(info.mid, None)
        if refused is not None:
            raise DeliveryError(f"{where} refused {msg.txid} on {topic}: {refused} (check the broker's ACL for "
                                f"client {self.client_id})", permanent=True)

    def close(self, timeout: float | None = None) -> None:
        """Set the status offline (retained), disconnect and stop the network thread."""
        if self._connected.is_set():
            info = self._client.publish(self.topics.status, self._status_payload("offline"), qos=1, retain=True)
            try:
                info.wait_for_publish(self.timeout if timeout is None else timeout)
            except (RuntimeError, ValueError) as e:
                log.warning("MQTT broker %s:%s: could not set %s offline (%s); the broker keeps the last status",
                            self.host, self.port, self.topics.status, e)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    def _status_payload(self, status: str) -> bytes:
        doc: dict[str, Any] = {"status": status, "service": "defectops", "client_id": self.client_id}
        if status == "online":
            doc.update(version=self.version, since=int(time.time()))
        return json.dumps(doc, sort_keys=True).encode()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags, reason_code: ReasonCode,
                    properties: Properties | None) -> None:
        if reason_code.is_failure:
            self._last_error = f"connection refused: {reason_code}"
            log.warning("MQTT broker %s:%s refused %s: %s", self.host, self.port, self.client_id, reason_code)
            return
        self._last_error = None
        # Connected counts from the broker's PUBACK of the retained "online" (_on_publish): whoever subscribes after
        # `connected` turns true reads "online" as the retained status.
        self._status_mid = client.publish(self.topics.status, self._status_payload("online"), qos=1, retain=True).mid
        log.info("MQTT broker %s:%s connected as %s (session present: %s)", self.host, self.port, self.client_id,
                 flags.session_present)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        self._connected.clear()
        self._last_error = f"disconnected: {reason_code}"
        log.info("MQTT broker %s:%s disconnected %s: %s", self.host, self.port, self.client_id, reason_code)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode,
                    properties: Properties | None) -> None:
        if mid == self._status_mid:
            self._status_mid = None
            if reason_code.is_failure:
                self._last_error = f"the broker refused the status topic {self.topics.status}: {reason_code}"
                log.error("MQTT broker %s:%s: %s", self.host, self.port, self._last_error)
            self._connected.set()
        elif reason_code.is_failure:
            with self._refused_lock:
                self._refused[mid] = reason_code


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``: the value of ``X-DefectOps-Signature``."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def verify_signature(secret: bytes, body: bytes, timestamp: str, signature: str, max_age_s: float = 300.0, *,
                     now: float | None = None) -> bool:
    """Whether a webhook request is authentic: ``signature`` (``X-DefectOps-Signature``) is the HMAC of
    ``"<timestamp>.<body>"`` under ``secret`` (compared in constant time) and ``timestamp`` (``X-DefectOps-Timestamp``,
    Unix seconds) is within ``max_age_s`` of ``now``, which bounds replays of a captured request. Pass the raw body
    bytes as received, before any JSON parsing."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > max_age_s:
        return False
    return hmac.compare_digest(sign(secret, str(ts), body), signature or "")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: urllib would turn the POST into a GET without its body."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None


class WebhookSink:
    """POSTs each message to ``url`` with its txid, a timestamp and an HMAC-SHA256 signature (module docstring).

    2xx acknowledges. 408, 429, every 5xx and network errors are retried (``Retry-After`` honoured). Any other status
    (4xx, a 3xx: redirects are not followed) is a permanent failure: :class:`DeliveryError` with ``permanent`` set; the
    publisher keeps the message at the head of the spool (nothing is dropped), logs it and reports the sink failing,
    and retries at its longest back-off until the receiver is fixed.
    """

    def __init__(self, url: str, secret: bytes, *, timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook url {url!r} must start with http:// or https://")
        if not secret:
            raise ValueError(f"webhook {url}: the signing secret is empty; set the secret shared with the receiver")
        self.url, self.timeout = url, float(timeout)
        self._secret = bytes(secret)
        self._clock = clock
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        if ssl_context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
        self._opener = urllib.request.build_opener(*handlers)

    def send(self, msg: Message) -> None:
        timestamp = str(int(self._clock()))
        req = urllib.request.Request(self.url, data=msg.payload, method="POST", headers={
            "Content-Type": "application/json",
            HEADER_TRANSACTION: msg.txid,
            HEADER_TIMESTAMP: timestamp,
            HEADER_SIGNATURE: sign(self._secret, timestamp, msg.payload),
            HEADER_TOPIC: msg.topic,
        })
        try:
            with self._opener.open(req, timeout=self.timeout) as r:
                status, headers = int(r.status), r.headers
                r.read()
        except urllib.error.HTTPError as e:
            status, headers = int(e.code), e.headers
            e.close()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise DeliveryError(f"webhook {self.url} unreachable ({reason}): kept in the spool, retried") from e
        if 200 <= status < 300:
            return
        permanent = status < 500 and status not in RETRYABLE_4XX
        what = "refused" if permanent else "answered"
        fix = "fix the receiver or the URL/secret; kept in the spool" if permanent else "retried"
        raise DeliveryError(f"webhook {self.url} {what} {msg.txid} with HTTP {status}: {fix}", permanent=permanent,
                            retry_after=_retry_after(headers.get("Retry-After") if headers is not None else None))


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: ignored, the back-off applies
