"""``defectops bench latency``: the classifier's latency in every runtime, against the line's per-board time budget."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from defectops.core.layout import RUN
from defectops.pipelines.cli.common import EXIT_FAILURE, EXIT_USAGE, console, fail, resolve_tracking_uri

bench_app = typer.Typer(help="Measure what a model costs to run.", no_args_is_help=True)

RUNTIMES = ("eager", "onnx_fp32", "onnx_int8", "triton")


@dataclass
class BenchModels:
    """What one ``--model`` reference gives the bench: the PyTorch module, the ONNX artifacts and their facts."""

    source: str
    eager: Any
    fp32: Path
    int8: Path | None
    input_size: int
    in_chans: int
    int8_macro_recall_drop: float | None
    int8_note: str
    crops_per_board: float | None


def _crops_per_board(dataset: dict[str, Any]) -> float | None:
    boards = dataset.get("boards") or 0
    per_split = dataset.get("crops_per_split") or dataset.get("crops")  # evidence/dataset.json | crop stats
    crops = sum(sum(c.values()) for c in per_split.values()) if isinstance(per_split, dict) else 0
    return crops / boards if boards and crops else None


def _int8_facts(report: dict[str, Any] | None) -> tuple[float | None, str]:
    if not report:
        return None, "no INT8 artifact (export.int8.enabled=false, or exported before INT8 existed)"
    drop = float(report["macro_recall_drop"])
    if report.get("publish"):
        return drop, "verified and published"
    return drop, "refused: " + "; ".join(report.get("reasons") or [])


def _from_run_root(root: Path) -> BenchModels:
    from defectops.core.fsutil import read_json
    from defectops.training.trainer import load_trained_model

    model_pt, fp32 = root / RUN.model, root / RUN.onnx
    for p, step in ((model_pt, "train"), (fp32, "export")):
        if not p.is_file():
            raise fail(f"run root {root} has no {p.relative_to(root)}: run its {step} step first", EXIT_USAGE)
    net, state = load_trained_model(model_pt)
    int8 = root / RUN.onnx_int8
    report_path = root / RUN.int8_report
    drop, note = _int8_facts(read_json(report_path) if report_path.is_file() else None)
    crops_meta = root / RUN.crops / "snapshot.json"
    stats = (read_json(crops_meta).get("stats") or {}) if crops_meta.is_file() else {}
    return BenchModels(str(root), net, fp32, int8 if int8.is_file() else None, int(state["img_size"]),
                       int(state.get("in_chans", 3)), drop, note, _crops_per_board(stats))


def _from_registry(ref: str, tracking_uri: str, cache: Path, allow_pickle: bool | None = None) -> BenchModels:
    from defectops.serving.model_ref import ModelRefError, cache_folder, parse_registry_ref, registry_version, resolve
    from defectops.training.models.model_format import ModelFormatError, load_registered_model

    try:
        parsed = parse_registry_ref(ref)
        assert parsed is not None
        c, mv = registry_version(*parsed, tracking_uri, ref)
        resolved = resolve(f"models:/{parsed[0]}/{mv.version}", tracking_uri=tracking_uri, cache_dir=cache,
                           precision="fp32")
    except ModelRefError as e:
        raise fail(str(e), EXIT_USAGE) from None
    run_id = str(mv.run_id)
    bench = cache_folder(cache, "bench", tracking_uri, parsed[0], str(mv.version))
    bench.mkdir(parents=True, exist_ok=True)
    if not (bench / "model").is_dir():
        c.download_artifacts(run_id, "model", str(bench))
    try:
        net = load_registered_model(bench / "model", allow_pickle=allow_pickle)
    except ModelFormatError as e:  # a pickled version without --allow-pickle, an incomplete artifact
        raise fail(f"{ref} (version {mv.version}): {e}", EXIT_USAGE) from None
    int8 = None
    if mv.tags.get("defectops.int8_published") == "true":
        int8 = bench / "model.int8.onnx"
        if not int8.is_file():
            Path(c.download_artifacts(run_id, "onnx/model.int8.onnx", str(bench))).replace(int8)
    report = None
    try:
        report = json.loads(Path(c.download_artifacts(run_id, "onnx/int8.json", str(bench))).read_text())
    except Exception:  # noqa: BLE001 - exported before INT8 existed: reported as such
        report = None
    dataset = None
    try:
        dataset = json.loads(Path(c.download_artifacts(run_id, "evidence/dataset.json", str(bench))).read_text())
    except Exception:  # noqa: BLE001 - registered before the evidence existed: crops per board unknown
        dataset = None
    drop, note = _int8_facts(report)
    return BenchModels(resolved.source, net, resolved.onnx_path, int8, resolved.input_size, 3, drop, note,
                       _crops_per_board(dataset or {}))


def _runners(m: BenchModels, threads: int, triton: tuple[str, str, str] | None) -> dict[str, Any]:
    import torch

    from defectops.serving.onnx_export import OUTPUT_NAME, onnx_session

    torch.set_num_threads(threads)
    out: dict[str, Any] = {}

    def eager(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return m.eager(torch.from_numpy(x))

    out["eager"] = eager
    for key, path in (("onnx_fp32", m.fp32), ("onnx_int8", m.int8)):
        if path is None:
            continue
        session = onnx_session(path, threads=threads)
        out[key] = (lambda s: lambda x: s.run([OUTPUT_NAME], {"images": x}))(session)
    if triton:
        from defectops.serving.client import TritonClient, TritonClientError

        url, model, protocol = triton
        try:
            client = TritonClient(url, model, protocol=protocol)
            client.logits(np.zeros((1, m.in_chans, m.input_size, m.input_size), np.float32))
        except TritonClientError as e:
            raise fail(str(e), EXIT_FAILURE) from None
        out["triton"] = client.logits
    return out


@bench_app.command("latency")
def latency(
    model: Annotated[str, typer.Option("--model", help="A run root or models:/<name>@<alias> | "
                                                       "models:/<name>/<version> (needs the PyTorch weights for the "
                                                       "eager baseline).")],
    line_rate: Annotated[float, typer.Option("--line-rate", help="Line rate in boards per minute: sets the per-board "
                                                                 "time budget (60000 / rate ms).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    batches: Annotated[str, typer.Option(help="Batch sizes to try for the best batch (comma-separated).")] =
        "1,8,32,64",
    crops_per_board: Annotated[float | None, typer.Option(help="Crops the classifier sees per board (default: the "
                                                               "run's candidates per board, else 1).")] = None,
    triton_url: Annotated[str | None, typer.Option(help="Also time a Triton server serving the model (e.g. "
                                                        "http://127.0.0.1:8000 or grpc://127.0.0.1:8001).")] = None,
    triton_model: Annotated[str | None, typer.Option(help="Model name on the Triton server (default: the registry "
                                                          "name for models:/ references).")] = None,
    triton_protocol: Annotated[str, typer.Option(help="http or grpc.")] = "http",
    threads: Annotated[int, typer.Option(help="CPU threads for each in-process runtime.")] = 2,
    seconds: Annotated[float, typer.Option(help="Minimum timed seconds per runtime and batch size.")] = 1.0,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI for models:/ references (default: "
                                                          "$MLFLOW_TRACKING_URI, else $DEFECTOPS_HOME's SQLite).")]
        = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Load a version registered in the old pickled "
                                               "MLflow PyTorch format (unpickling runs code from the artifact store: "
                                               "only for a store you trust). Default: refused.")] = False,
) -> None:
    """p50/p99 latency and images/s of PyTorch eager, ONNX FP32, ONNX INT8 and (with --triton-url) Triton, at batch 1
    and at the best batch, against the time budget per board at --line-rate.

    The runtimes run one after the other in this process on the same random inputs (latency does not depend on the
    pixels); ratios against eager are printed because absolute times on a shared machine are noisy. The INT8 model's
    macro-recall drop is the one its verify_export step measured. Exit codes: 0 ok, 1 failure (e.g. Triton
    unreachable), 2 usage error.
    """
    from defectops.pipelines.config import home_dir
    from defectops.serving.latency import line_budget, measure

    try:
        sizes = sorted({int(b) for b in batches.split(",") if b.strip()})
    except ValueError:
        raise fail(f"--batches {batches!r} is not a comma-separated list of integers, e.g. 1,8,32,64",
                   EXIT_USAGE) from None
    if not sizes or sizes[0] < 1:
        raise fail("--batches needs positive batch sizes, e.g. 1,8,32,64", EXIT_USAGE)
    if line_rate <= 0:
        raise fail(f"--line-rate must be > 0 boards per minute, got {line_rate}", EXIT_USAGE)
    if triton_protocol not in ("http", "grpc"):
        raise fail(f"--triton-protocol must be http or grpc, got {triton_protocol!r}", EXIT_USAGE)
    home = home_dir()
    if model.startswith("models:/"):
        uri = resolve_tracking_uri(tracking_uri, home)
        m = _from_registry(model, uri, home / "cache", allow_pickle=allow_pickle or None)
        default_name = model.removeprefix("models:/").split("@")[0].split("/")[0]
    else:
        root = Path(model).expanduser()
        if not root.is_dir():
            raise fail(f"--model {model!r} is neither a run root nor a models:/ reference", EXIT_USAGE)
        m = _from_run_root(root)
        default_name = None
    triton = None
    if triton_url:
        name = triton_model or default_name
        if not name:
            raise fail("--triton-model is needed with a run root (the model's name on the Triton server)", EXIT_USAGE)
        triton = (triton_url, name, triton_protocol)
    runners = _runners(m, threads, triton)
    rng = np.random.default_rng(0)
    images = rng.random((max(sizes), m.in_chans, m.input_size, m.input_size), dtype=np.float32)
    results: dict[str, dict[str, Any]] = {}
    with console.status("timing runtimes...") as status:
        for name, run in runners.items():
            per_batch = {}
            for b in sizes:
                status.update(f"timing {name} at batch {b}...")
                per_batch[b] = measure(run, images, b, min_seconds=seconds)
            best = max(per_batch.values(), key=lambda r: r.images_per_s)
            one = per_batch.get(1) or per_batch[sizes[0]]
            results[name] = {"p50_ms": one.p50_ms, "p99_ms": one.p99_ms, "images_per_s": one.images_per_s,
                             "batch": one.batch, "best": best.to_dict(),
                             "per_batch": {str(b): r.to_dict() for b, r in per_batch.items()}}
    cpb = crops_per_board if crops_per_board is not None else (m.crops_per_board or 1.0)
    for r in results.values():
        r["line"] = line_budget(line_rate, cpb, r["best"]["images_per_s"]).to_dict()
    budget = line_budget(line_rate, cpb, 1.0).budget_ms
    out = {**{k: results.get(k) for k in RUNTIMES}, "budget_ms": budget, "line_rate_bpm": line_rate,
           "crops_per_board": cpb, "int8_macro_recall_drop": m.int8_macro_recall_drop, "int8": m.int8_note,
           "model": m.source, "threads": threads, "cpus": os.cpu_count()}
    if triton is None:
        out["triton_note"] = "not measured: pass --triton-url"
    if as_json:
        print(json.dumps(out, indent=2))
        return
    _print_tables(out, results)


def _print_tables(out: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    eager = results["eager"]
    console.print(f"latency of {out['model']} ({out['threads']} threads, {out['cpus']} CPUs); @1 = batch 1, "
                  "* = best batch; board ms and margin at the best batch")
    t = Table()
    for col in ("runtime", "p50@1 ms", "p99@1 ms", "img/s@1", "x eager", "batch*", "img/s*", "x eager*", "board ms",
                "margin ms"):
        t.add_column(col, justify="left" if col == "runtime" else "right", no_wrap=True)
    for name, r in results.items():
        best, line = r["best"], r["line"]
        t.add_row(name, f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['images_per_s']:.0f}",
                  f"{r['images_per_s'] / eager['images_per_s']:.2f}", str(best["batch"]), f"{best['images_per_s']:.0f}",
                  f"{best['images_per_s'] / eager['best']['images_per_s']:.2f}", f"{line['per_board_ms']:.2f}",
                  f"[{'green' if line['margin_ms'] >= 0 else 'red'}]{line['margin_ms']:.1f}[/]")
    console.print(t)
    drop = out["int8_macro_recall_drop"]
    console.print(f"line rate {out['line_rate_bpm']:g} boards/min -> budget {out['budget_ms']:.1f} ms per board, "
                  f"{out['crops_per_board']:.1f} crops per board; INT8: {out['int8']}"
                  + (f" (macro-recall drop {100 * drop:.2f} points)" if drop is not None else ""))
    if "triton_note" in out:
        console.print(f"triton: {out['triton_note']}")


def register(app: typer.Typer) -> None:
    """``defectops bench ...``."""
    app.add_typer(bench_app, name="bench")
