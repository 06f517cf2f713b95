"""`defectops line serve` end to end over HTTP on this machine, against `predict boards` in the same run.

The same board pairs (synthetic DeepPCB-format boards, 640 x 640 by default, or a DeepPCB folder) are judged by:

- **predict boards** (the baseline): the board detector over the pairs in process, no HTTP, no storage;
- **line serve, one client**: `POST /v1/inspect` with the tested image and the template, one request after the other,
  through a `defectops line serve` subprocess (the production path: upload, decode, detect, store the images and
  the result with fsync, count metrics): latency p50 / p99 and boards/s;
- **line serve, N clients** in parallel: boards/s at saturation.

The per-board budget at a stated line rate: a line with a cycle time of ``--cycle-s`` seconds per board must get each
verdict back in well under that; the table gives p99 latency as a share of it.

    .venv/bin/python benchmarks/line_serve.py --model <run root | models:/name@champion> [--boards 60]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def main() -> int:
    import requests
    from rich.console import Console
    from rich.table import Table

    from defectops.serving.model_ref import resolve
    from defectops.serving.predict import detector_for
    from defectops.training.synth import write_deeppcb_root

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a board (aoi) model: run root, ONNX file or models:/...")
    ap.add_argument("--tracking-uri", default="", help="for models:/ references")
    ap.add_argument("--boards", type=int, default=60)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cycle-s", type=float, default=15.0, help="line cycle time per board (seconds)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="defectops-line-bench-"))
    write_deeppcb_root(work / "boards", args.boards, 7, size=args.size)
    pairs = []
    for ln in (work / "boards" / "trainval.txt").read_text().splitlines():
        stem = ln.split()[0].removesuffix(".jpg")
        pairs.append((Path(stem).name, work / "boards" / f"{stem}_temp.jpg", work / "boards" / f"{stem}_test.jpg"))
    model = resolve(args.model, tracking_uri=args.tracking_uri, cache_dir=work / "cache")

    detector = detector_for(model, args.threads)
    list(detector.run(pairs[:2]))  # warm-up
    t0 = time.perf_counter()
    n = sum(1 for _ in detector.run(pairs))
    base_s = time.perf_counter() - t0
    base_bps = n / base_s

    port = _free_port()
    env = {**os.environ, "DEFECTOPS_HOME": str(work / "home")}
    cli = Path(sys.executable).with_name("defectops")
    proc = subprocess.Popen([str(cli), "line", "serve", "--model", args.model, "--store", str(work / "store"),
                             "--port", str(port), "--threads", str(args.threads), "--site", "bench", "--line", "l1",
                             *(["--tracking-uri", args.tracking_uri] if args.tracking_uri else [])],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("line serve did not become ready")
            time.sleep(0.2)

        def post(i: int, session: requests.Session) -> float:
            _, template, tested = pairs[i % len(pairs)]
            t = time.perf_counter()
            r = session.post(f"{url}/v1/inspect", files={"image": (tested.name, tested.read_bytes()),
                                                         "template": (template.name, template.read_bytes())},
                             data={"unit_id": f"u{i}"}, timeout=120)
            r.raise_for_status()
            return time.perf_counter() - t

        with requests.Session() as s:
            for i in range(2):
                post(i, s)  # warm-up
            t0 = time.perf_counter()
            lat = [post(i, s) for i in range(len(pairs))]
            serial_s = time.perf_counter() - t0
        conc: list[float] = []
        lock = threading.Lock()

        def client(k: int) -> None:
            with requests.Session() as s:
                for i in range(k, len(pairs), args.clients):
                    v = post(i, s)
                    with lock:
                        conc.append(v)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conc_s = time.perf_counter() - t0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)

    rows = {
        "predict boards (in process, baseline)": {"boards_per_s": base_bps, "p50_ms": None, "p99_ms": None},
        "line serve, 1 client (HTTP + store)": {"boards_per_s": len(pairs) / serial_s, "p50_ms": _pct(lat, 50) * 1e3,
                                               "p99_ms": _pct(lat, 99) * 1e3},
        f"line serve, {args.clients} clients": {"boards_per_s": len(pairs) / conc_s, "p50_ms": _pct(conc, 50) * 1e3,
                                               "p99_ms": _pct(conc, 99) * 1e3},
    }
    table = Table(title=f"{len(pairs)} boards of {args.size} x {args.size}, model {model.source} "
                        f"({args.threads} threads)", title_justify="left")
    for col in ("path", "boards/s", "vs predict boards", "p50 ms", "p99 ms", f"p99 / {args.cycle_s:g} s cycle"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for name, r in rows.items():
        p99 = r["p99_ms"]
        table.add_row(name, f"{r['boards_per_s']:.2f}", f"{r['boards_per_s'] / base_bps:.2f}x",
                      "-" if r["p50_ms"] is None else f"{r['p50_ms']:.0f}", "-" if p99 is None else f"{p99:.0f}",
                      "-" if p99 is None else f"{p99 / 1e3 / args.cycle_s:.1%}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"boards": len(pairs), "size": args.size, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
