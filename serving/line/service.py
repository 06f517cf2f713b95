"""``defectops line serve``: the inspection service at the line (HTTP and a watched folder in, results out).

:class:`LineService` holds the current model (:class:`serving.line.inspector.ModelHolder`), inspects boards, keeps
every image with its result (:class:`serving.line.store.LineStore`), hands each result to the configured outlets
(MQTT, IPC-CFX, webhooks: :meth:`LineService.add_outlet`), feeds the systematic-defect monitor and counts everything
for Prometheus. :meth:`LineService.refresh` follows the registry alias (``champion``): a new version is loaded
completely, then swapped in; requests already running finish with the version they started with, and every result
names its version. :func:`serving.line.http.create_app` is its HTTP face.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectops.core.fsutil import write_json
from defectops.evaluation.line_alarm import Alarm, AlarmConfig, AlarmMonitor, BoardDefects, location_of
from defectops.serving.line.inspector import InspectionError, Inspector, ModelHolder, load_inspector
from defectops.serving.line.results import InspectionResult, ModelInfo, new_transaction_id, utc_now
from defectops.serving.line.store import VERDICTS, LineStore
from defectops.serving.model_ref import ModelRefError, ResolvedModel

log = logging.getLogger("defectops.line")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class LineConfig:
    """What one ``line serve`` process serves: which model (``models:/<name>@champion``, a run root or an ONNX
    file), for which site and line, where it keeps images and results, where templates are found by id, how often
    it looks for a new champion, and the board grid that names a defect's location."""

    model: str
    site: str
    line_id: str
    store: Path
    tracking_uri: str = ""
    cache_dir: Path = Path(".")
    templates: Path | None = None
    poll_s: float = 10.0
    threads: int = 2
    grid: tuple[int, int] = (8, 8)
    max_upload_bytes: int = 50 * 1024 * 1024
    alarm: AlarmConfig = field(default_factory=AlarmConfig)


Outlet = Callable[[InspectionResult], None]
AlarmOutlet = Callable[[Alarm, InspectionResult], None]
ALARM_STATE = "alarm_state.json"


@dataclass
class _Metrics:
    registry: Any
    latency: Any
    boards: Any
    defects: Any
    errors: Any
    version: Any
    swaps: Any
    alarms: Any


def _metrics() -> _Metrics:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    r = CollectorRegistry()
    buckets = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
    return _Metrics(
        r, Histogram("defectops_line_inspection_seconds", "Time to inspect one board (model + store)", ["line"],
                     buckets=buckets, registry=r),
        Counter("defectops_line_boards_total", "Boards inspected, by result", ["line", "result"], registry=r),
        Counter("defectops_line_defects_total", "Defects reported, by type", ["line", "type"], registry=r),
        Counter("defectops_line_errors_total", "Boards that could not be inspected, by reason", ["line", "reason"],
                registry=r),
        Gauge("defectops_line_model_version", "Registered version of the model being served", ["model"], registry=r),
        Counter("defectops_line_model_swaps_total", "Times a new model version was swapped in", registry=r),
        Counter("defectops_line_alarms_total", "Systematic-defect alarms raised, by kind", ["line", "kind"],
                registry=r))


class LineService:
    def __init__(self, cfg: LineConfig, *, resolver: Callable[[], tuple[ResolvedModel, ModelInfo]] | None = None
                 ) -> None:
        self.cfg = cfg
        self.store = LineStore(cfg.store)
        self.holder = ModelHolder()
        self.metrics = _metrics()
        self.outlets: list[tuple[str, Outlet]] = []
        self.alarm_outlets: list[tuple[str, AlarmOutlet]] = []
        state = self.store.root / ALARM_STATE
        self.monitor = (AlarmMonitor.from_state(json.loads(state.read_text(encoding="utf-8"))) if state.is_file()
                        else AlarmMonitor(cfg.alarm))
        self._monitor_lock = threading.Lock()
        self._resolver = resolver or self._resolve
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------------------------------------ the model
    def _resolve(self) -> tuple[ResolvedModel, ModelInfo]:
        from defectops.serving.model_ref import parse_registry_ref, registry_version, resolve

        ref = self.cfg.model
        parsed = parse_registry_ref(ref)
        if parsed is None:
            m = resolve(ref, tracking_uri=self.cfg.tracking_uri, cache_dir=self.cfg.cache_dir)
            return m, ModelInfo(Path(ref).name, "local", m.task, m.source, m.good_class)
        name, alias, version = parsed
        _, mv = registry_version(name, alias, version, self.cfg.tracking_uri, ref)
        m = resolve(f"models:/{name}/{mv.version}", tracking_uri=self.cfg.tracking_uri, cache_dir=self.cfg.cache_dir)
        return m, ModelInfo(name, str(mv.version), m.task, ref, m.good_class)

    def refresh(self) -> bool:
        """Load the model ``cfg.model`` names now, if it is another version than the one served; True when swapped.
        A model that fails to load leaves the current one serving (and raises when there is none)."""
        with self._refresh_lock:
            model, info = self._resolver()
            cur = self.holder.current()
            if cur is not None and (cur.info.name, cur.info.version) == (info.name, info.version):
                return False
            inspector = load_inspector(model, info, threads=self.cfg.threads)
            self.holder.swap(inspector)
            self.metrics.version.labels(info.name).set(float(info.version) if info.version.isdigit() else 0.0)
            if cur is not None:
                self.metrics.swaps.inc()
            log.info("serving %s version %s (%s)", info.name, info.version, info.task)
            return True

    def current(self) -> Inspector:
        inspector = self.holder.current()
        if inspector is None:
            raise RuntimeError("no model loaded yet")
        return inspector

    def start_following(self) -> None:
        """Poll the registry every ``cfg.poll_s`` seconds for a new version of the alias (a thread)."""
        def loop() -> None:
            while not self._stop.wait(self.cfg.poll_s):
                try:
                    self.refresh()
                except Exception as e:  # noqa: BLE001 - a registry hiccup must not stop the line: keep serving
                    log.warning("could not refresh %s: %s", self.cfg.model, e)

        t = threading.Thread(target=loop, name="defectops-line-follow", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self.save_alarm_state()

    def save_alarm_state(self) -> None:
        """The monitor's counts (baselines, CUSUMs, recent boards) to the store: a restart continues, not re-learns."""
        with self._monitor_lock:
            write_json(self.store.root / ALARM_STATE, self.monitor.state())

    # ------------------------------------------------------------------------------------------------ inspection
    def add_outlet(self, name: str, outlet: Outlet) -> None:
        self.outlets.append((name, outlet))

    def add_alarm_outlet(self, name: str, outlet: AlarmOutlet) -> None:
        self.alarm_outlets.append((name, outlet))

    def _deliver(self, outlets: list[tuple[str, Any]], line: str, *args: Any) -> None:
        for name, outlet in outlets:
            try:
                outlet(*args)
            except Exception as e:  # noqa: BLE001 - an outlet's failure is logged and counted; the result is stored
                self.metrics.errors.labels(line, f"outlet_{name}").inc()
                log.error("outlet %s failed: %s", name, e)

    def _watch_for_alarms(self, result: InspectionResult) -> list[Alarm]:
        board = BoardDefects(result.unit_id, result.line_id,
                             tuple((d.type, d.designator or d.location) for d in result.defects),
                             result.result == "fail")
        with self._monitor_lock:
            alarms = self.monitor.update(board)
            observed = self.monitor.boards_observed(result.line_id)
        for a in alarms:
            self.metrics.alarms.labels(result.line_id, a.kind).inc()
            self.store.append_alarm({**a.to_dict(), "raised": utc_now(), "transaction_id": result.transaction_id,
                                     "site": self.cfg.site, "model": result.model.to_dict()})
            log.warning("alarm %s on %s: %s %s since %s", a.kind, a.line_id, a.defect_type, a.location, a.since_unit)
        if observed % 100 == 0:
            self.save_alarm_state()
        return alarms

    def template_path(self, template_id: str) -> Path:
        """The template image of ``template_id`` under ``cfg.templates`` (any image suffix)."""
        if self.cfg.templates is None:
            raise InspectionError(f"template id {template_id!r} given, but this service has no template folder: start "
                                  "it with --templates DIR or send the template image")
        if not template_id or "/" in template_id or "\\" in template_id or template_id.startswith("."):
            raise InspectionError(f"template id {template_id!r} is not a plain name")
        for suffix in IMAGE_SUFFIXES:
            p = self.cfg.templates / f"{template_id}{suffix}"
            if p.is_file():
                return p
        raise InspectionError(f"no template {template_id!r} in {self.cfg.templates}: add {template_id}.png there")

    def inspect(self, tested: Path, *, unit_id: str, template: Path | None = None, line_id: str | None = None,
                position: int | None = None, move: bool = False) -> InspectionResult:
        """Inspect one board with the current model, keep its images and result, hand it to every outlet."""
        inspector = self.current()  # once: a swap during this request does not change who judges this board
        line = line_id or self.cfg.line_id
        txid, started, t0 = new_transaction_id(), utc_now(), time.perf_counter()
        if template is None and inspector.needs_template:
            raise InspectionError(f"model {inspector.info.name} v{inspector.info.version} compares each board with "
                                  "its template: send the template image or a template id")
        try:
            verdict = inspector.inspect(tested, template, lambda b, w, h: location_of(b, w, h, self.cfg.grid))
        except InspectionError:
            self.metrics.errors.labels(line, "bad_input").inc()
            raise
        board = self.store.board_dir(txid, started[:10])
        kept = self.store.keep_image(tested, board, "tested", move=move)
        if template is not None and inspector.needs_template:
            self.store.keep_image(template, board, "template", move=False)
        seconds = time.perf_counter() - t0
        result = InspectionResult(txid, unit_id, line, self.cfg.site, inspector.info,
                                  "fail" if verdict.failed else "pass", started, utc_now(), seconds * 1000.0,
                                  str(kept.relative_to(self.store.root)), verdict.defects, position, verdict.score)
        self.store.append_result(result.to_dict())
        self.metrics.latency.labels(line).observe(seconds)
        self.metrics.boards.labels(line, result.result).inc()
        for d in verdict.defects:
            self.metrics.defects.labels(line, d.type).inc()
        self._deliver(self.outlets, line, result)
        for alarm in self._watch_for_alarms(result):
            self._deliver(self.alarm_outlets, line, alarm, result)
        return result

    def record_verdict(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Store a repair station's verification of a reported board: ``{"transaction_id", "operator",
        "verdicts": [{"defect": <index>, "verdict": confirmed|false_fail|accepted, "type": <corrected type>?}],
        "missed": [{"box": [x1, y1, x2, y2], "type": ...}]?}``. ValueError naming what is wrong."""
        txid = str(doc.get("transaction_id") or "")
        result = self.store.result(txid)
        if result is None:
            raise LookupError(f"no inspection result with transaction_id {txid!r} in this store")
        n = len(result["defects"])
        verdicts = doc.get("verdicts") or []
        if not isinstance(verdicts, list):
            raise ValueError("verdicts must be a list of {defect, verdict}")
        for v in verdicts:
            if not isinstance(v, dict) or not isinstance(v.get("defect"), int) or not 0 <= v["defect"] < n:
                raise ValueError(f"each verdict needs 'defect': the index of a reported defect (0..{n - 1})")
            if v.get("verdict") not in VERDICTS:
                raise ValueError(f"verdict {v.get('verdict')!r} is not one of {', '.join(VERDICTS)}")
        for m in doc.get("missed") or []:
            box = m.get("box") if isinstance(m, dict) else None
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(x, int | float) for x in box)
                    and isinstance(m.get("type"), str)):
                raise ValueError("each missed defect needs 'box': [x1, y1, x2, y2] and 'type'")
        record = {"transaction_id": txid, "operator": str(doc.get("operator") or ""),
                  "station": str(doc.get("station") or ""), "received": utc_now(), "verdicts": verdicts,
                  "missed": doc.get("missed") or [], "model": result["model"], "line_id": result["line_id"],
                  "unit_id": result["unit_id"]}
        self.store.append_verdict(record)
        return record


__all__ = ["IMAGE_SUFFIXES", "InspectionError", "LineConfig", "LineService", "ModelRefError"]
