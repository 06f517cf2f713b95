"""Systematic-defect alarms at the line: a pure monitor over the stream of inspection results, one board at a time.

What: :class:`AlarmMonitor` reads one :class:`BoardDefects` per inspected board (the unit, its line, the defects found
as ``(defect type, location)`` pairs and whether the board was rejected) and returns the :class:`Alarm` s it raises:

* ``recurrence``: the same defect type at the same location (a board region cell from :func:`location_of`, or a
  reference designator when the result carries one) on at least ``recurrence_k`` of the last ``recurrence_n`` boards
  of the line. A blunt, baseline-free rule: it fires from the first board and names the run's first unit.
* ``location_shift``: a Bernoulli CUSUM per (location, type) on the indicator "this board has that defect there",
  against the location's baseline rate ``p0`` (configured, or estimated on the line's first ``warmup_boards`` boards).
  It catches faults too sparse for the k-of-n rule (a placer that misses one board in five).
* ``reject_rate``: a two-sided Bernoulli CUSUM on the line's reject indicator against its baseline reject rate: a rise
  (the process got worse everywhere) or a fall (boards no longer flagged: a camera or model problem).

Why: a defect that repeats at one place across consecutive boards is a process fault upstream (a clogged stencil
aperture, a mis-taught placement, a worn nozzle), and it is the signal the printer or pick-and-place correction needs;
a board-by-board verdict cannot show it.

Why a CUSUM and not an EWMA: the fault we look for is a step (the aperture clogs, the placer loses its teach point), for
which the CUSUM is the optimal detector (shortest worst-case delay for a given false-alarm rate, Moustakides 1986), and
it carries its own change-point estimate (the board after it last stood at zero), which becomes the alarm's
``since_unit``. Per-location defect indicators are very sparse (``p0`` of 1e-4 to 1e-2): the Bernoulli CUSUM's
log-likelihood-ratio form handles them exactly, whereas an EWMA of a rare indicator needs a normal approximation that
does not hold, and a smoothing constant with no such interpretation. The statistic is written in nats of
log-likelihood ratio, ``S_t = max(0, S_{t-1} + log f1(x_t) / f0(x_t))``, so one decision interval ``h`` means the same
evidence at every location whatever its baseline (Wald: the in-control run length of one chart is at least ``e^h``),
and the chart is updated lazily: between two defects at a location ``S`` only falls by ``log((1 - p0) / (1 - p1))``
per clean board, so a board costs work only for the defects it carries. The chart is tuned to a rise from ``p0`` to
``p1`` (``cusum_p1``, an absolute rate worth a correction, at least ``2 p0``); its reference value ``k`` in defects per
board follows from ``p0`` and ``p1`` (Reynolds & Stoumbos 1999) and is reported in each alarm's evidence. Configuring
``p1`` rather than ``k`` keeps one setting meaningful across locations whose baselines differ by orders of magnitude.

One fault raises one alarm: after an alarm the (location, type) is latched, for both location rules, until it has been
clean for ``rearm_after`` consecutive boards. The reject-rate chart is latched until a reverse CUSUM finds the rate
back at baseline (``reject_h`` nats of evidence for ``p0`` against the shifted rate).

Baselines are frozen at the end of the warm-up (a fault is not learnt as normal); a fault present during the warm-up
inflates its location's baseline and is then left to the recurrence rule. A location first seen after the warm-up
has the estimate of a location with no defect in it, ``1 / (warmup_boards + 2)``.

Pure: no I/O, state in memory; :meth:`AlarmMonitor.state` and :meth:`AlarmMonitor.from_state` give it as JSON-ready
data for a service to persist. ``docs/line_alarm.md`` has the measured false-alarm rate and detection delays
(``benchmarks/line_alarm.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

__all__ = [
    "Alarm",
    "AlarmConfig",
    "AlarmKind",
    "AlarmMonitor",
    "BoardDefects",
    "location_of",
    "reference_value",
]

AlarmKind = Literal["recurrence", "location_shift", "reject_rate"]
STATE_VERSION = 1


def location_of(box: Sequence[float], width: int, height: int, grid: tuple[int, int]) -> str:
    """The region cell ``"r{row}c{col}"`` (0-based, row 0 at the top) of the centre of ``box`` = ``(x1, y1, x2, y2)``
    in pixels, on a ``grid = (rows, cols)`` laid over a ``width`` x ``height`` board image. A centre on or outside the
    image's edge falls in the nearest cell."""
    if len(box) != 4:
        raise ValueError(f"box must be (x1, y1, x2, y2), got {len(box)} values")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width} x {height}")
    rows, cols = grid
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be (rows, cols) >= (1, 1), got {grid}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box must be finite, got {tuple(box)}")
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    row = min(max(math.floor(cy * rows / height), 0), rows - 1)
    col = min(max(math.floor(cx * cols / width), 0), cols - 1)
    return f"r{row}c{col}"


def reference_value(p0: float, p1: float) -> float:
    """The reference value ``k`` (defects per board) of the Bernoulli CUSUM tuned from ``p0`` to ``p1``: the
    unscaled chart ``max(0, S + x - k)`` signals exactly when the log-likelihood-ratio chart does (Reynolds & Stoumbos
    1999). Between ``p0`` and ``p1``."""
    return math.log((1 - p0) / (1 - p1)) / math.log(p1 * (1 - p0) / (p0 * (1 - p1)))


@dataclass(frozen=True)
class BoardDefects:
    """One inspected board: ``defects`` as ``(defect type, location)`` pairs (a location from :func:`location_of` or
    a reference designator; a pair listed twice counts once) and ``failed`` (the board was rejected)."""

    unit_id: str
    line_id: str
    defects: tuple[tuple[str, str], ...]
    failed: bool


@dataclass(frozen=True)
class AlarmConfig:
    """The rules and their thresholds. Defaults chosen with ``benchmarks/line_alarm.py`` (docs/line_alarm.md): on clean
    simulated lines (8 x 8 grid, 6 types, uneven cell weights) about 0.1 false alarms per 10,000 boards at 0.05 to 0.2
    random defects per board, 0.6 at 0.5 and 6 at 1 (there, use 4 of 6 for the recurrence rule).

    * ``recurrence_k`` of the last ``recurrence_n`` boards of a line with the same defect type at the same location
      raise a ``recurrence`` alarm (3 of 5: at a location's rate of 0.3 % a false one every ~6 x 10^6 boards per
      location, and a fault on every board is named on its third board).
    * ``warmup_boards``: the first boards of each line estimate the baselines (location: ``(count + 1) /
      (warmup_boards + 2)``; reject rate likewise); the CUSUMs start after them. Unused for a configured baseline.
    * ``baseline_rate``: the per-board rate of one (location, type) when known (e.g. from history); ``None``: estimated.
    * ``cusum_p1``: the rate of one (location, type) the location CUSUM is tuned to detect (0.05: one board in 20 with
      the same defect at the same place is a fault to correct); at least ``2 p0`` for a location above it.
    * ``cusum_h``: the location CUSUM's decision interval, in nats of log-likelihood ratio.
    * ``baseline_reject_rate``: the line's reject rate when known; ``None``: estimated over the warm-up.
    * ``reject_shift``: the reject-rate chart is tuned to ``p0 * reject_shift`` (up) and ``p0 / reject_shift`` (down).
    * ``reject_h``: the reject-rate CUSUM's decision interval (nats), also the evidence needed to re-arm it.
    * ``rearm_after``: consecutive clean boards after which an alarmed (location, type) can alarm again.
    """

    recurrence_k: int = 3
    recurrence_n: int = 5
    warmup_boards: int = 1000
    baseline_rate: float | None = None
    cusum_p1: float = 0.05
    cusum_h: float = 14.0
    baseline_reject_rate: float | None = None
    reject_shift: float = 2.0
    reject_h: float = 12.0
    rearm_after: int = 100

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"AlarmConfig.{name} {why}, got {getattr(self, name)!r}")

        def is_number(value: object) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("recurrence_k", "recurrence_n", "warmup_boards", "rearm_after"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise bad(name, "must be an integer")
        for name in ("cusum_p1", "cusum_h", "reject_shift", "reject_h", "baseline_rate", "baseline_reject_rate"):
            if not is_number(getattr(self, name)) and not (name.startswith("baseline") and getattr(self, name) is None):
                raise bad(name, "must be a finite number")
        estimated = self.baseline_rate is None or self.baseline_reject_rate is None
        rules = (
            ("recurrence_k", self.recurrence_k >= 2, "must be at least 2 (one defect is not a recurrence)"),
            ("recurrence_n", self.recurrence_n >= self.recurrence_k, f"must be >= recurrence_k ({self.recurrence_k})"),
            ("warmup_boards", self.warmup_boards >= 0, "must be >= 0"),
            ("warmup_boards", self.warmup_boards >= 1 or not estimated,
             "must be >= 1 when a baseline is estimated (baseline_rate or baseline_reject_rate is None)"),
            ("rearm_after", self.rearm_after >= 1, "must be at least 1 board"),
            ("cusum_p1", 0 < self.cusum_p1 < 1, "must be a rate in (0, 1)"),
            ("cusum_h", self.cusum_h > 0, "must be > 0"),
            ("reject_shift", self.reject_shift > 1, "must be > 1 (the factor of the shift to detect)"),
            ("reject_h", self.reject_h > 0, "must be > 0"),
            ("baseline_rate", self.baseline_rate is None or 0 < self.baseline_rate < self.cusum_p1,
             f"must be None (estimated over the warm-up) or a rate in (0, cusum_p1 = {self.cusum_p1})"),
            ("baseline_reject_rate", self.baseline_reject_rate is None or 0 < self.baseline_reject_rate < 1,
             "must be None (estimated over the warm-up) or a rate in (0, 1)"),
        )
        for name, ok, why in rules:
            if not ok:
                raise bad(name, why)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Alarm:
    """One alarm. ``location``/``defect_type`` are ``None`` for ``reject_rate``. ``since_unit``: the first unit of the
    run of recurrences, or the CUSUM's change-point estimate (the board after it last stood at zero). ``at_unit``: the
    board that triggered it; ``boards_observed``: boards of the line seen so far, that one included. ``evidence``: the
    counts, the statistic and its threshold, the baseline rate (JSON-ready)."""

    kind: AlarmKind
    line_id: str
    location: str | None
    defect_type: str | None
    since_unit: str
    at_unit: str
    boards_observed: int
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "line_id": self.line_id, "location": self.location,
                "defect_type": self.defect_type, "since_unit": self.since_unit, "at_unit": self.at_unit,
                "boards_observed": self.boards_observed, "evidence": dict(self.evidence)}


# ------------------------------------------------------------------------------------------------------ state
@dataclass
class _KeyState:
    """One (defect type, location) of one line. Board indices count the line's boards from 1."""

    warmup_count: int = 0  # boards with this defect here during the warm-up
    last_seen: int = 0  # board index of the last occurrence (0: never)
    recent: list[tuple[int, str]] = field(default_factory=list)  # occurrences in the last recurrence_n boards
    run_start: str = ""  # unit of the first occurrence of the current run (gaps < recurrence_n boards)
    s: float = 0.0  # CUSUM statistic (nats) as of board s_at
    s_at: int = 0
    s_start: str = ""  # change-point estimate: unit of the board that lifted S from zero
    s_start_at: int = 0
    s_hits: int = 0  # occurrences since s_start
    latched: bool = False


@dataclass
class _RejectSide:
    """One side (up or down) of the reject-rate CUSUM."""

    s: float = 0.0
    start: str = ""
    start_at: int = 0
    rejects: int = 0  # rejects since start
    latched: bool = False
    release: float = 0.0  # reverse CUSUM (evidence for p0) while latched


@dataclass
class _LineState:
    boards: int = 0
    warmup_rejects: int = 0
    keys: dict[tuple[str, str], _KeyState] = field(default_factory=dict)
    up: _RejectSide = field(default_factory=_RejectSide)
    down: _RejectSide = field(default_factory=_RejectSide)


def _bernoulli_llr(p0: float, p1: float) -> tuple[float, float]:
    """Log-likelihood ratios ``log f1(x) / f0(x)`` of one Bernoulli trial for ``x = 1`` and ``x = 0``."""
    return math.log(p1 / p0), math.log((1 - p1) / (1 - p0))


class AlarmMonitor:
    """The monitor over one or more lines (state per ``line_id``). ``update`` one board at a time, in line order."""

    def __init__(self, config: AlarmConfig | None = None) -> None:
        self.config = config or AlarmConfig()
        self._lines: dict[str, _LineState] = {}

    # ----------------------------------------------------------------------------------------------- baselines
    def _cusum_start(self) -> int:
        """Board index after which the location CUSUM runs."""
        return 0 if self.config.baseline_rate is not None else self.config.warmup_boards

    def _reject_start(self) -> int:
        return 0 if self.config.baseline_reject_rate is not None else self.config.warmup_boards

    def location_baseline(self, line_id: str, defect_type: str, location: str) -> float | None:
        """The baseline rate ``p0`` of a (type, location) of a line; ``None`` while it is being estimated."""
        if self.config.baseline_rate is not None:
            return self.config.baseline_rate
        line = self._lines.get(line_id)
        if line is None or line.boards < self.config.warmup_boards:
            return None
        key = line.keys.get((defect_type, location))
        return ((key.warmup_count if key else 0) + 1) / (self.config.warmup_boards + 2)

    def reject_baseline(self, line_id: str) -> float | None:
        """The baseline reject rate of a line; ``None`` while it is being estimated."""
        if self.config.baseline_reject_rate is not None:
            return self.config.baseline_reject_rate
        line = self._lines.get(line_id)
        if line is None or line.boards < self.config.warmup_boards:
            return None
        return (line.warmup_rejects + 1) / (self.config.warmup_boards + 2)

    def _p1(self, p0: float) -> float:
        return max(self.config.cusum_p1, min(2 * p0, (1 + p0) / 2))

    # --------------------------------------------------------------------------------------------------- update
    def update(self, board: BoardDefects) -> list[Alarm]:
        """Read the next board of its line; the alarms it raises (usually none)."""
        line = self._lines.setdefault(board.line_id, _LineState())
        line.boards += 1
        t = line.boards
        alarms: list[Alarm] = []
        for pair in sorted(set(board.defects)):
            defect_type, location = pair
            key = line.keys.get(pair)
            if key is None:
                key = line.keys[pair] = _KeyState()
            alarm = self._update_key(line, key, board, defect_type, location, t)
            if alarm is not None:
                alarms.append(alarm)
        if t <= self.config.warmup_boards:
            line.warmup_rejects += int(board.failed)
        alarms.extend(self._update_rejects(line, board, t))
        return alarms

    def _update_key(self, line: _LineState, key: _KeyState, board: BoardDefects, defect_type: str, location: str,
                    t: int) -> Alarm | None:
        cfg = self.config
        if t <= cfg.warmup_boards:
            key.warmup_count += 1
        gap = t - key.last_seen if key.last_seen else t
        if key.latched and gap > cfg.rearm_after:
            key.latched = False
            key.s, key.s_at, key.s_hits = 0.0, t - 1, 0
        if not key.last_seen or gap >= cfg.recurrence_n:
            key.run_start = board.unit_id
        key.last_seen = t
        key.recent = [(i, u) for i, u in key.recent if i > t - cfg.recurrence_n]
        key.recent.append((t, board.unit_id))
        # the CUSUM, brought up to this board: the clean boards since its last update, then this defect
        start = self._cusum_start()
        p0 = self.location_baseline(board.line_id, defect_type, location)
        statistic, p1 = 0.0, 0.0
        if p0 is not None and t > start and not key.latched:
            p1 = self._p1(p0)
            hit, clean = _bernoulli_llr(p0, p1)
            clean_boards = t - 1 - max(key.s_at, start)
            key.s = max(0.0, key.s + clean_boards * clean)
            if key.s == 0.0:
                key.s_start, key.s_start_at, key.s_hits = board.unit_id, t, 0
            key.s += hit
            key.s_hits += 1
            key.s_at = t
            statistic = key.s
        if key.latched:
            return None
        base = {"baseline_rate": p0, "boards_observed": t}
        if len(key.recent) >= cfg.recurrence_k:
            key.latched = True
            return Alarm("recurrence", board.line_id, location, defect_type, key.run_start, board.unit_id, t,
                         {**base, "count": len(key.recent), "window": cfg.recurrence_n, "k": cfg.recurrence_k,
                          "threshold": cfg.recurrence_k, "statistic": len(key.recent),
                          "units": [u for _, u in key.recent]})
        if p0 is not None and statistic >= cfg.cusum_h:
            key.latched = True
            boards = t - key.s_start_at + 1
            return Alarm("location_shift", board.line_id, location, defect_type, key.s_start, board.unit_id, t,
                         {**base, "statistic": round(statistic, 4), "threshold": cfg.cusum_h, "p1": p1,
                          "reference_k": reference_value(p0, p1), "count": key.s_hits, "boards": boards,
                          "rate_since": key.s_hits / boards})
        return None

    def _update_rejects(self, line: _LineState, board: BoardDefects, t: int) -> list[Alarm]:
        cfg = self.config
        p0 = self.reject_baseline(board.line_id)
        if p0 is None or t <= self._reject_start():
            return []
        x = int(board.failed)
        alarms = []
        for direction, side, p1 in (("up", line.up, min(p0 * cfg.reject_shift, (1 + p0) / 2)),
                                    ("down", line.down, p0 / cfg.reject_shift)):
            hit, clean = _bernoulli_llr(p0, p1)
            llr = hit if x else clean
            if side.latched:
                side.release = max(0.0, side.release - llr)
                if side.release >= cfg.reject_h:
                    side.latched, side.release, side.s = False, 0.0, 0.0
                continue
            if side.s == 0.0:
                side.start, side.start_at, side.rejects = board.unit_id, t, 0
            side.s = max(0.0, side.s + llr)
            side.rejects += x
            if side.s >= cfg.reject_h:
                boards = t - side.start_at + 1
                alarms.append(Alarm("reject_rate", board.line_id, None, None, side.start, board.unit_id, t,
                                    {"direction": direction, "statistic": round(side.s, 4), "threshold": cfg.reject_h,
                                     "baseline_rate": p0, "p1": p1, "reference_k": reference_value(p0, p1),
                                     "count": side.rejects, "boards": boards, "rate_since": side.rejects / boards,
                                     "boards_observed": t}))
                side.latched, side.s, side.release = True, 0.0, 0.0
        return alarms

    def boards_observed(self, line_id: str) -> int:
        line = self._lines.get(line_id)
        return line.boards if line else 0

    # ---------------------------------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """The monitor's whole state as JSON-ready data (for a service to persist); :meth:`from_state` restores it."""
        lines = {}
        for line_id, line in self._lines.items():
            lines[line_id] = {
                "boards": line.boards, "warmup_rejects": line.warmup_rejects,
                "up": asdict(line.up), "down": asdict(line.down),
                "keys": [{"defect_type": dt, "location": loc, **{**asdict(k), "recent": [list(r) for r in k.recent]}}
                         for (dt, loc), k in line.keys.items()],
            }
        return {"version": STATE_VERSION, "config": self.config.to_dict(), "lines": lines}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> AlarmMonitor:
        """The monitor :meth:`state` saved (its config included)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported alarm monitor state version {state.get('version')!r}")
        monitor = cls(AlarmConfig(**state["config"]))
        key_fields = {f.name for f in fields(_KeyState)}
        for line_id, doc in state["lines"].items():
            line = _LineState(boards=int(doc["boards"]), warmup_rejects=int(doc["warmup_rejects"]),
                              up=_RejectSide(**doc["up"]), down=_RejectSide(**doc["down"]))
            for k in doc["keys"]:
                values = {name: k[name] for name in key_fields}
                values["recent"] = [(int(i), str(u)) for i, u in k["recent"]]
                line.keys[(str(k["defect_type"]), str(k["location"]))] = _KeyState(**values)
            monitor._lines[str(line_id)] = line
        return monitor
