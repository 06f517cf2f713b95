"""Where the line service's results and alarms go: MQTT (results, alarms, IPC-CFX ``UnitsInspected``) and a REST
webhook, through one durable spool (:mod:`serving.line.spool`) and an ordered publisher per receiver
(:mod:`serving.line.publisher`). A result is spooled before the HTTP answer goes back, so a receiver that is down
loses nothing: its messages wait on disk, in order, and are delivered when it returns (``docs/line.md``).

Message identities: a result's spool transaction is its ``transaction_id``; its CFX message is spooled as
``<transaction_id>:cfx`` and carries the envelope's ``UniqueID`` (derived from the transaction id, so a resent message
is recognisable); an alarm's id is a UUID5 of its line, kind, place, type and first unit, so the same alarm raised
twice (after a restart without its state) is one alarm to a receiver that de-duplicates.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from defectops.evaluation.line_alarm import Alarm
from defectops.serving.line.cfx import MESSAGE_NAME, cfx_handle, envelope, units_inspected, validate_message
from defectops.serving.line.publisher import Publisher
from defectops.serving.line.results import InspectionResult
from defectops.serving.line.service import LineService
from defectops.serving.line.sinks import MqttSink, Sink, WebhookSink
from defectops.serving.line.spool import Spool

_ALARM_NS = uuid.UUID("6b0c2f8e-3f4e-4d0e-9a51-2f1f8a7c9d11")


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = None
    cfx: bool = True  # also publish IPC-CFX UnitsInspected on <site>/<line>/cfx/<MessageName>


@dataclass(frozen=True)
class WebhookSettings:
    url: str
    secret: bytes


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode("utf-8")


def alarm_message(alarm: Alarm, result: InspectionResult) -> dict[str, Any]:
    """The alarm as published: the monitor's record, its id, where and by which model it was raised."""
    a = alarm.to_dict()
    key = f"{alarm.line_id}|{alarm.kind}|{alarm.location}|{alarm.defect_type}|{alarm.since_unit}"
    return {**a, "alarm_id": str(uuid.uuid5(_ALARM_NS, key)), "site": result.site,
            "transaction_id": result.transaction_id, "model": result.model.to_dict(), "raised": result.finished}


def connect(service: LineService, *, mqtt: MqttSettings | None = None, webhook: WebhookSettings | None = None
            ) -> Publisher | None:
    """Add the configured receivers to ``service`` and start delivering (None when none is configured). The caller
    stops the publisher (:meth:`Publisher.stop`) and closes the MQTT sink at shutdown (:func:`close`)."""
    sinks: dict[str, Sink] = {}
    cfg = service.cfg
    if mqtt is not None:
        sinks["mqtt"] = MqttSink(mqtt.host, mqtt.port, client_id=f"defectops-{cfg.site}-{cfg.line_id}",
                                 site=cfg.site, line=cfg.line_id, username=mqtt.username, password=mqtt.password)
    if webhook is not None:
        sinks["webhook"] = WebhookSink(webhook.url, webhook.secret)
    if not sinks:
        return None
    publisher = Publisher(Spool(service.store.root / "spool.db"), sinks)
    handle = cfx_handle(cfg.site, cfg.line_id)

    def results(r: InspectionResult) -> None:
        doc = r.to_dict()
        publisher.submit("results", _json(doc), r.transaction_id)
        if mqtt is not None and mqtt.cfx:
            message = envelope(units_inspected(doc), source=handle)
            validate_message(message)
            publisher.submit(f"cfx/{MESSAGE_NAME}", _json(message), f"{r.transaction_id}:cfx", only=["mqtt"])

    def alarms(a: Alarm, r: InspectionResult) -> None:
        doc = alarm_message(a, r)
        publisher.submit("alarms", _json(doc), doc["alarm_id"])

    service.add_outlet("publish", results)
    service.add_alarm_outlet("publish", alarms)
    _gauges(service, publisher)
    publisher.start()
    return publisher


class VerdictListener:
    """The repair station's verdicts over MQTT: a QoS 1 subscription (persistent session, so verdicts sent while the
    service is down are delivered when it is back) to ``<site>/<line>/repair/verdicts``; each message is one
    :meth:`LineService.record_verdict` body. A bad message is logged and counted (``reason="verdict"``), not lost
    silently and not fatal."""

    def __init__(self, service: LineService, settings: MqttSettings) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        from defectops.serving.line.sinks import topics

        cfg = service.cfg
        self.service, self.topic = service, topics(cfg.site, cfg.line_id).verdicts
        self.received = 0
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"defectops-{cfg.site}-{cfg.line_id}-verdicts",
                        protocol=MQTTProtocolVersion.MQTTv5)
        if settings.username is not None:
            c.username_pw_set(settings.username, settings.password)
        c.on_connect = lambda client, *_: client.subscribe(self.topic, qos=1)
        c.on_message = self._on_message
        c.reconnect_delay_set(1, 30)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 24 * 3600
        c.connect_async(settings.host, settings.port, keepalive=30, clean_start=False, properties=props)
        c.loop_start()
        self._client = c

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        import logging

        try:
            doc = json.loads(msg.payload)
            if not isinstance(doc, dict):
                raise ValueError("a verdict message is a JSON object")
            self.service.record_verdict(doc)
            self.received += 1
        except (ValueError, LookupError) as e:
            self.service.metrics.errors.labels(self.service.cfg.line_id, "verdict").inc()
            logging.getLogger("defectops.line").error("verdict on %s refused: %s", self.topic, e)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _gauges(service: LineService, publisher: Publisher) -> None:
    from prometheus_client import Gauge

    pending = Gauge("defectops_line_spool_pending", "Messages waiting in the spool, by receiver", ["sink"],
                    registry=service.metrics.registry)
    delivered = Gauge("defectops_line_delivered", "Messages delivered since start, by receiver", ["sink"],
                      registry=service.metrics.registry)
    failing = Gauge("defectops_line_sink_failing", "1 while a receiver refuses messages permanently", ["sink"],
                    registry=service.metrics.registry)
    def reader(name: str, what: str) -> Callable[[], float]:
        if what == "pending":
            return lambda: float(publisher.spool.pending(name))
        return lambda: float(getattr(publisher.stats()[name], what))

    for name in publisher.sinks:
        pending.labels(name).set_function(reader(name, "pending"))
        delivered.labels(name).set_function(reader(name, "delivered"))
        failing.labels(name).set_function(reader(name, "failing"))


def close(publisher: Publisher | None, timeout: float = 10.0) -> None:
    """Stop delivering (what is undelivered stays in the spool for the next start) and close the MQTT connection
    cleanly (its retained status becomes ``offline``)."""
    if publisher is None:
        return
    publisher.stop(timeout)
    for sink in publisher.sinks.values():
        if isinstance(sink, MqttSink):
            sink.close(timeout)
