"""Tests for evaluation.line_alarm: the recurrence (k of n) rule, the per-location CUSUM, the reject-rate CUSUM, the
cool-down, config validation and the persisted state, on seeded synthetic streams of inspection results."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from defectops.evaluation.line_alarm import (
    Alarm,
    AlarmConfig,
    AlarmMonitor,
    BoardDefects,
    location_of,
    reference_value,
)

GRID = (8, 8)
CELLS = tuple(f"r{r}c{c}" for r in range(GRID[0]) for c in range(GRID[1]))
TYPES = ("solder_bridge", "insufficient_solder", "missing_component", "tombstone", "misalignment", "solder_ball")
FAULT = ("solder_bridge", "r3c4")


def unit(i: int) -> str:
    return f"U{i:06d}"


def stream(seed: int, boards: int, base_rate: float = 0.15, *, fault: tuple[str, str] = FAULT,
           fault_rate: float = 0.0, fault_from: int = 0, fault_until: int | None = None,
           reject_rate: float | None = None, reject_from: int = 0, new_reject_rate: float = 0.0,
           line_id: str = "L1") -> Iterator[BoardDefects]:
    """Boards 1..``boards`` with Poisson(``base_rate``) random defects spread over the grid and types (a few cells
    three times likelier: the hot spots of a real board); ``fault`` added to ``fault_rate`` of the boards in
    [``fault_from``, ``fault_until``). A board fails when it has a defect, or, with ``reject_rate`` set, with that
    probability (``new_reject_rate`` from board ``reject_from``)."""
    rng = np.random.default_rng(seed)
    weights = np.ones(len(CELLS))
    weights[rng.choice(len(CELLS), 6, replace=False)] = 3.0
    weights /= weights.sum()
    for i in range(1, boards + 1):
        n = int(rng.poisson(base_rate))
        defects = [(TYPES[int(rng.integers(len(TYPES)))], CELLS[int(rng.choice(len(CELLS), p=weights))])
                   for _ in range(n)]
        if fault_from and i >= fault_from and (fault_until is None or i < fault_until) and rng.random() < fault_rate:
            defects.append(fault)
        if reject_rate is None:
            failed = bool(defects)
        else:
            failed = bool(rng.random() < (new_reject_rate if reject_from and i >= reject_from else reject_rate))
        yield BoardDefects(unit(i), line_id, tuple(defects), failed)


def run(monitor: AlarmMonitor, boards: Iterator[BoardDefects] | Sequence[BoardDefects]) -> list[Alarm]:
    return [alarm for board in boards for alarm in monitor.update(board)]


def index(unit_id: str) -> int:
    return int(unit_id[1:])


def key_board(i: int, *, with_fault: bool, line_id: str = "L1") -> BoardDefects:
    return BoardDefects(unit(i), line_id, (FAULT,) if with_fault else (), with_fault)


# ----------------------------------------------------------------------------------------------------- location_of
def test_location_of_is_the_cell_of_the_box_centre() -> None:
    assert location_of((0, 0, 10, 10), 800, 600, GRID) == "r0c0"
    assert location_of((790, 590, 800, 600), 800, 600, GRID) == "r7c7"  # centre on the last cell, not past it
    assert location_of((400, 225, 500, 300), 800, 600, GRID) == "r3c4"  # centre (450, 262.5)
    assert location_of((-20, -20, -10, -10), 800, 600, GRID) == "r0c0"  # outside: the nearest cell
    assert location_of((0, 0, 800, 600), 800, 600, (1, 1)) == "r0c0"
    assert location_of((299, 0, 301, 10), 600, 100, (2, 3)) == "r0c1"


@pytest.mark.parametrize(("box", "width", "height", "grid", "match"), [
    ((0, 0, 1), 10, 10, GRID, "box"),
    ((0, 0, 1, 1), 0, 10, GRID, "width and height"),
    ((0, 0, 1, 1), 10, 10, (0, 4), "grid"),
    ((0, 0, float("nan"), 1), 10, 10, GRID, "finite"),
])
def test_location_of_rejects_bad_input(box: tuple[float, ...], width: int, height: int, grid: tuple[int, int],
                                       match: str) -> None:
    with pytest.raises(ValueError, match=match):
        location_of(box, width, height, grid)


# ------------------------------------------------------------------------------------------------------ recurrence
def test_an_injected_recurring_defect_is_named_within_12_boards() -> None:
    """"solder_bridge" at r3c4 on 60 % of the boards from unit 500: one recurrence alarm naming the place, the type and
    the run's first unit, within 12 boards of the injection (3 of 5 at 60 %: P(not yet after 12 boards) < 1e-3)."""
    boards = list(stream(3, 1500, fault_rate=0.6, fault_from=500))
    alarms = run(AlarmMonitor(), boards)
    first_faulty = next(b.unit_id for b in boards[499:] if FAULT in b.defects)
    located = [a for a in alarms if a.kind != "reject_rate"]
    assert len(located) == 1, [a.to_dict() for a in located]
    alarm = located[0]
    assert (alarm.kind, alarm.location, alarm.defect_type, alarm.line_id) == ("recurrence", "r3c4", "solder_bridge",
                                                                                "L1")
    assert alarm.since_unit == first_faulty
    assert 500 <= index(alarm.at_unit) < 500 + 12
    assert alarm.boards_observed == index(alarm.at_unit)
    assert alarm.evidence["count"] == alarm.evidence["threshold"] == 3
    assert alarm.evidence["units"][0] == first_faulty and alarm.evidence["units"][-1] == alarm.at_unit
    json.dumps(alarm.to_dict())


@pytest.mark.parametrize(("k", "n"), [(2, 3), (3, 5), (4, 6), (5, 5)])
def test_k_of_n_fires_on_exactly_the_kth_recurrence_in_the_window(k: int, n: int) -> None:
    config = AlarmConfig(recurrence_k=k, recurrence_n=n, cusum_h=1e6)  # the CUSUM out of the way
    monitor = AlarmMonitor(config)
    # k - 1 occurrences spread so that no window of n boards holds more than k - 1, and never k
    occurrences = set(range(1, n * (k - 1) + 1, n))
    last = max(occurrences)
    assert run(monitor, [key_board(i, with_fault=i in occurrences) for i in range(1, last + n + 1)]) == []
    # now k in a row: the alarm comes on the k-th exactly
    start = last + n + 1
    for j in range(k):
        alarms = monitor.update(key_board(start + j, with_fault=True))
        assert [a.kind for a in alarms] == (["recurrence"] if j == k - 1 else [])
    assert alarms[0].since_unit == unit(start) and alarms[0].at_unit == unit(start + k - 1)
    assert alarms[0].evidence["count"] == k and alarms[0].evidence["window"] == n


def test_no_false_alarm_on_20000_clean_boards() -> None:
    """0.15 random defects per board (DPMO-level defect rates plus residual false calls) over 64 cells with hot spots
    and 6 types: the defaults raise nothing (benchmarks/line_alarm.py measures the rate: docs/line_alarm.md)."""
    alarms = run(AlarmMonitor(), stream(11, 20_000, 0.15))
    assert alarms == [], [a.to_dict() for a in alarms[:5]]


# -------------------------------------------------------------------------------------------------------- cool-down
def test_one_fault_raises_one_alarm_and_rearms_after_a_clean_spell() -> None:
    config = AlarmConfig(rearm_after=50)
    monitor = AlarmMonitor(config)

    def located(boards: Iterator[BoardDefects]) -> list[Alarm]:
        return [a for a in run(monitor, boards) if a.kind != "reject_rate"]

    # the fault on every board for 400 boards (recurrence, and the CUSUM well past h): one alarm
    first = located(key_board(i, with_fault=1500 <= i < 1900) for i in range(1, 1900))
    assert [(a.kind, a.since_unit, a.at_unit) for a in first] == [("recurrence", unit(1500), unit(1502))]
    # clean for fewer than rearm_after boards, then back: still the same fault, no new alarm
    assert located(key_board(i, with_fault=i >= 1940) for i in range(1900, 2000)) == []
    # clean for rearm_after boards, then back: a new alarm
    again = located(key_board(i, with_fault=i >= 2050) for i in range(2000, 2060))
    assert [(a.kind, a.since_unit, a.at_unit) for a in again] == [("recurrence", unit(2050), unit(2052))]


# ------------------------------------------------------------------------------------------------------------ CUSUM
def test_the_location_cusum_catches_a_fault_too_sparse_for_k_of_n() -> None:
    """A fault on 20 % of the boards with the recurrence rule made strict (5 of 5, i.e. off for such a fault): the
    per-location CUSUM names it within 150 boards, with the first faulty board as its change point."""
    config = AlarmConfig(recurrence_k=5, recurrence_n=5)
    boards = list(stream(5, 3000, fault_rate=0.2, fault_from=2000))
    alarms = [a for a in run(AlarmMonitor(config), boards) if a.kind != "reject_rate"]
    assert len(alarms) == 1, [a.to_dict() for a in alarms]
    alarm = alarms[0]
    assert (alarm.kind, alarm.location, alarm.defect_type) == ("location_shift", "r3c4", "solder_bridge")
    assert alarm.since_unit == next(b.unit_id for b in boards[1999:] if FAULT in b.defects)
    assert 2000 <= index(alarm.at_unit) < 2150
    ev = alarm.evidence
    assert ev["statistic"] >= ev["threshold"] == config.cusum_h
    assert ev["baseline_rate"] < ev["reference_k"] < ev["p1"] == config.cusum_p1
    assert ev["baseline_rate"] == pytest.approx(1 / (config.warmup_boards + 2))  # never seen in the warm-up


def test_reference_value_lies_between_the_rates_and_matches_the_llr_chart() -> None:
    p0, p1 = 0.002, 0.05
    k = reference_value(p0, p1)
    assert p0 < k < p1
    # the unscaled chart's step x - k is the log-likelihood ratio divided by log(p1 (1 - p0) / (p0 (1 - p1)))
    scale = np.log(p1 * (1 - p0) / (p0 * (1 - p1)))
    assert (1 - k) * scale == pytest.approx(np.log(p1 / p0))
    assert -k * scale == pytest.approx(np.log((1 - p1) / (1 - p0)))


# ------------------------------------------------------------------------------------------------------ reject rate
@pytest.mark.parametrize(("new_rate", "direction", "within"), [(0.15, "up", 400), (0.0, "down", 600)])
def test_a_shift_of_the_reject_rate_is_detected(new_rate: float, direction: str, within: int) -> None:
    """Reject rate 5 % then 15 % (or 0 %: nothing flagged any more) from board 3000: one reject-rate alarm in that
    direction, after the shift and within ``within`` boards, none before. A fall to zero is slow to prove: each clean
    board adds only log((1 - p0 / 2) / (1 - p0)) = 0.026 nats at p0 = 5 %, so h = 12 takes ~460 boards."""
    boards = stream(8, 4000, 0.0, reject_rate=0.05, reject_from=3000, new_reject_rate=new_rate)
    alarms = run(AlarmMonitor(), boards)
    assert [(a.kind, a.evidence["direction"]) for a in alarms] == [("reject_rate", direction)]
    alarm = alarms[0]
    assert alarm.location is None and alarm.defect_type is None
    assert 3000 <= index(alarm.at_unit) < 3000 + within
    assert index(alarm.since_unit) <= index(alarm.at_unit)
    assert 0.0 < alarm.evidence["baseline_rate"] < 0.15


def test_configured_baselines_skip_the_warm_up_and_lines_are_separate() -> None:
    config = AlarmConfig(baseline_rate=0.001, baseline_reject_rate=0.05, warmup_boards=0)
    monitor = AlarmMonitor(config)
    assert monitor.location_baseline("L1", *FAULT) == 0.001 and monitor.reject_baseline("L1") == 0.05
    # two lines interleaved: L1's fault on boards 1-3, L2's on 1, 3, 5: each line's own count, never their sum
    faulty = {"L1": {1, 2, 3}, "L2": {1, 3, 5}}
    alarms = run(monitor, [key_board(i, with_fault=i in faulty[line], line_id=line) for i in range(1, 6)
                           for line in ("L1", "L2")])
    located = [(a.line_id, a.kind, a.since_unit, a.at_unit) for a in alarms if a.kind != "reject_rate"]
    assert located == [("L1", "recurrence", unit(1), unit(3)), ("L2", "recurrence", unit(1), unit(5))]
    assert monitor.boards_observed("L1") == monitor.boards_observed("L2") == 5


# ----------------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(("overrides", "field"), [
    ({"recurrence_k": 1}, "recurrence_k"),
    ({"recurrence_k": 4, "recurrence_n": 3}, "recurrence_n"),
    ({"recurrence_k": 2.5}, "recurrence_k"),
    ({"warmup_boards": -1}, "warmup_boards"),
    ({"warmup_boards": 0}, "warmup_boards"),
    ({"rearm_after": 0}, "rearm_after"),
    ({"cusum_p1": 1.0}, "cusum_p1"),
    ({"cusum_h": 0.0}, "cusum_h"),
    ({"cusum_h": float("inf")}, "cusum_h"),
    ({"reject_h": -1.0}, "reject_h"),
    ({"reject_shift": 1.0}, "reject_shift"),
    ({"baseline_rate": 0.0}, "baseline_rate"),
    ({"baseline_rate": 0.2}, "baseline_rate"),
    ({"baseline_reject_rate": 1.5}, "baseline_reject_rate"),
])
def test_bad_config_is_rejected_naming_the_field(overrides: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=rf"AlarmConfig\.{field}\b"):
        AlarmConfig(**overrides)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------------ state
def test_state_round_trips_through_json_mid_stream() -> None:
    boards = list(stream(21, 3000, 0.2, fault_rate=0.3, fault_from=1200, fault_until=1400, reject_rate=0.05,
                         reject_from=2000, new_reject_rate=0.2))
    whole = run(AlarmMonitor(), boards)
    first = AlarmMonitor()
    before = run(first, boards[:1300])
    restored = AlarmMonitor.from_state(json.loads(json.dumps(first.state())))
    assert restored.state() == first.state()
    assert [a.to_dict() for a in before + run(restored, boards[1300:])] == [a.to_dict() for a in whole]
    assert {a.kind for a in whole} >= {"reject_rate"}
    with pytest.raises(ValueError, match="version"):
        AlarmMonitor.from_state({**first.state(), "version": 0})
