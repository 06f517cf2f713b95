"""The systematic-defect alarm (evaluation/line_alarm.py) on seeded simulated lines: its false-alarm rate on clean
streams and its detection delay for injected faults.

Simulated line: each board carries Poisson(base rate) random defects, each at a cell of an 8 x 8 grid and of one of 6
types, drawn from per-stream weights (Dirichlet(1) over cells, Dirichlet(2) over types: some cells and types are
several times likelier than others, as on a real board); a board is rejected when it carries a defect.

* False alarms: ``--streams`` clean streams of ``--boards`` boards per base rate; every alarm is false. Reported as
  alarms per 10,000 boards with an exact (Garwood) 95 % Poisson interval and as the in-control average run length
  (boards per false alarm).
* Detection delay (location faults): from board ``--inject-at`` (after the warm-up) one (cell, type) is added to a
  fraction of boards (100 %, 60 %, 30 %, 10 %); the delay is the number of boards from the injection to the first
  alarm naming that cell and type, the injected board counted as 1 (a fault on every board, 3 of 5: 3). Streams with
  no such alarm within ``--horizon`` boards are counted as missed.
* Detection delay (reject rate): from ``--inject-at`` the base rate is multiplied (x2, x3); the delay to the first
  ``reject_rate`` alarm.

    .venv/bin/python benchmarks/line_alarm.py
    .venv/bin/python benchmarks/line_alarm.py --boards 100000 --streams 10 --fault-streams 200 --json out.json
    .venv/bin/python benchmarks/line_alarm.py --set cusum_h=14 --set warmup_boards=2000
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GRID = (8, 8)
TYPES = ("solder_bridge", "insufficient_solder", "missing_component", "tombstone", "misalignment", "solder_ball")


def simulate(seed: int, boards: int, base_rate: float, *, fault_rate: float = 0.0, inject_at: int = 0,
             rate_factor: float = 1.0, line_id: str = "L1") -> tuple[Iterator[Any], tuple[str, str]]:
    """A seeded stream of ``BoardDefects`` and the (type, location) of its fault (drawn whether or not injected)."""
    import numpy as np

    from defectops.evaluation.line_alarm import BoardDefects

    rng = np.random.default_rng(seed)
    cells = [f"r{r}c{c}" for r in range(GRID[0]) for c in range(GRID[1])]
    cell_w = rng.dirichlet(np.ones(len(cells)))
    type_w = rng.dirichlet(np.full(len(TYPES), 2.0))
    fault = (TYPES[int(rng.integers(len(TYPES)))], cells[int(rng.integers(len(cells)))])

    def boards_() -> Iterator[BoardDefects]:
        chunk = 4096
        for begin in range(0, boards, chunk):
            n = min(chunk, boards - begin)
            idx = np.arange(begin + 1, begin + n + 1)
            after = idx >= inject_at if inject_at else np.zeros(n, bool)
            counts = rng.poisson(base_rate * np.where(after, rate_factor, 1.0))
            total = int(counts.sum())
            locs = rng.choice(len(cells), size=total, p=cell_w)
            kinds = rng.choice(len(TYPES), size=total, p=type_w)
            faulty = after & (rng.random(n) < fault_rate)
            pos = 0
            for j in range(n):
                c = int(counts[j])
                defects = tuple((TYPES[kinds[pos + i]], cells[locs[pos + i]]) for i in range(c))
                pos += c
                if faulty[j]:
                    defects = (*defects, fault)
                yield BoardDefects(f"U{idx[j]:07d}", line_id, defects, bool(defects))

    return boards_(), fault


def poisson_interval(count: int, exposure: float, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Garwood) interval of a Poisson rate ``count / exposure``."""
    from scipy.stats import chi2

    a = 1 - confidence
    low = chi2.ppf(a / 2, 2 * count) / 2 if count else 0.0
    high = chi2.ppf(1 - a / 2, 2 * count + 2) / 2
    return low / exposure, high / exposure


def main() -> int:
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from defectops.evaluation.line_alarm import AlarmConfig, AlarmMonitor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-rates", default="0.05,0.2,0.5,1.0", help="random defects per board (comma-separated)")
    ap.add_argument("--boards", type=int, default=100_000, help="boards per clean stream")
    ap.add_argument("--streams", type=int, default=5, help="clean streams per base rate")
    ap.add_argument("--fault-rates", default="1.0,0.6,0.3,0.1", help="fraction of boards with the injected fault")
    ap.add_argument("--reject-factors", default="2,3", help="base-rate multipliers for the reject-rate shift")
    ap.add_argument("--fault-streams", type=int, default=100, help="streams per (base rate, fault) cell")
    ap.add_argument("--inject-at", type=int, default=1500, help="first board of the fault (after the warm-up)")
    ap.add_argument("--horizon", type=int, default=1000, help="boards after the injection before a miss is counted")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override an AlarmConfig field (repeatable), e.g. --set cusum_h=14")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    overrides: dict[str, Any] = {}
    for item in args.set:
        name, _, value = item.partition("=")
        overrides[name] = None if value == "None" else float(value) if "." in value else int(value)
    config = AlarmConfig(**overrides)
    base_rates = [float(x) for x in args.base_rates.split(",")]
    console = Console(width=150)
    console.print(f"AlarmConfig: {config.to_dict()}")
    console.print(f"simulated line: {GRID[0]} x {GRID[1]} grid, {len(TYPES)} types, Dirichlet cell/type weights, "
                  f"reject = board with a defect; seed {args.seed}")
    result: dict[str, Any] = {"config": config.to_dict(), "args": {k: str(v) for k, v in vars(args).items()},
                              "false_alarms": [], "delays": []}
    t0 = time.perf_counter()

    fa = Table(title=f"False alarms on clean streams ({args.streams} x {args.boards:,} boards per base rate)")
    for col in ("defects/board", "boards", "false alarms", "per 10k boards [95 %]", "in-control ARL (boards) [95 %]",
                "by kind"):
        fa.add_column(col)
    for bi, base in enumerate(base_rates):
        alarms: dict[str, int] = {}
        for s in range(args.streams):
            stream, _ = simulate(args.seed + 1_000_003 * (bi + 1) + s, args.boards, base)
            monitor = AlarmMonitor(config)
            for board in stream:
                for alarm in monitor.update(board):
                    alarms[alarm.kind] = alarms.get(alarm.kind, 0) + 1
        n, total = args.streams * args.boards, sum(alarms.values())
        low, high = poisson_interval(total, n / 10_000)
        arl = f"{n / total:,.0f}" if total else f"> {n:,}"
        arl_bounds = f"[{1e4 / high:,.0f}, {1e4 / low:,.0f}]" if low > 0 else f"[{1e4 / high:,.0f}, inf]"
        fa.add_row(f"{base:g}", f"{n:,}", str(total), f"{total / (n / 1e4):.3f} [{low:.3f}, {high:.3f}]",
                   f"{arl} {arl_bounds}", ", ".join(f"{k} {v}" for k, v in sorted(alarms.items())) or "-")
        result["false_alarms"].append({"base_rate": base, "boards": n, "alarms": total, "by_kind": alarms,
                                       "per_10k": total / (n / 1e4), "per_10k_low": low, "per_10k_high": high})
    console.print(fa)

    delays = Table(title=f"Detection delay (boards from injection, injected board = 1; {args.fault_streams} streams "
                         f"per row, miss = no alarm within {args.horizon:,} boards)")
    for col in ("defects/board", "fault", "median", "p90", "max", "missed", "first alarm kind",
                "since - first faulty board: median [min, max]"):
        delays.add_column(col)
    scenarios = [("location", float(f), 1.0) for f in args.fault_rates.split(",")]
    scenarios += [("reject", 0.0, float(r)) for r in args.reject_factors.split(",")]
    for bi, base in enumerate(base_rates):
        for what, fault_rate, factor in scenarios:
            found: list[int] = []
            kinds: dict[str, int] = {}
            since_err: list[int] = []
            for s in range(args.fault_streams):
                seed = args.seed + 7_000_003 * (bi + 1) + 10_007 * len(found) + s + int(fault_rate * 1e6 + factor)
                stream, fault = simulate(seed, args.inject_at + args.horizon, base, fault_rate=fault_rate,
                                         inject_at=args.inject_at, rate_factor=factor)
                monitor = AlarmMonitor(config)
                first_fault_unit = None
                for i, board in enumerate(stream, start=1):
                    if first_fault_unit is None and fault in board.defects and i >= args.inject_at:
                        first_fault_unit = board.unit_id
                    hit = [a for a in monitor.update(board) if i >= args.inject_at and (
                        (what == "location" and (a.defect_type, a.location) == fault)
                        or (what == "reject" and a.kind == "reject_rate" and a.evidence["direction"] == "up"))]
                    if hit:
                        found.append(i - args.inject_at + 1)
                        kinds[hit[0].kind] = kinds.get(hit[0].kind, 0) + 1
                        first = first_fault_unit if what == "location" else f"U{args.inject_at:07d}"
                        since_err.append(int(hit[0].since_unit[1:]) - int(str(first)[1:]))
                        break
            label = f"{fault_rate:.0%} of boards" if what == "location" else f"reject: defects x{factor:g}"
            d = np.array(found) if found else np.array([np.nan])
            row = {"base_rate": base, "scenario": label, "median": float(np.median(d)),
                   "p90": float(np.percentile(d, 90)), "max": float(np.max(d)),
                   "missed": args.fault_streams - len(found), "streams": args.fault_streams, "kinds": kinds,
                   "since_error": since_err}
            result["delays"].append(row)
            delays.add_row(f"{base:g}", label, f"{row['median']:g}", f"{row['p90']:g}", f"{row['max']:g}",
                           f"{row['missed']}/{args.fault_streams}",
                           ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "-",
                           f"{np.median(since_err):g} [{min(since_err)}, {max(since_err)}]" if since_err else "-")
    console.print(delays)
    console.print(f"{time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
