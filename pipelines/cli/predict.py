"""``defectops predict``: board-level detection on DeepPCB-format lists and classification of image folders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from defectops.pipelines.cli.common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    console,
    fail,
    image_paths,
    progress_bars,
    resolve_tracking_uri,
)

if TYPE_CHECKING:
    from defectops.serving.model_ref import ResolvedModel

predict_app = typer.Typer(help="Predict with a registered, run-root or ONNX model.", no_args_is_help=True)

ModelRef = Annotated[str, typer.Option("--model", help="models:/<name>@<alias> | models:/<name>/<version> | a run "
                                                       "root | an .onnx file exported by defectops.")]
TrackingUri = Annotated[str | None, typer.Option(help="MLflow tracking URI for models:/ references (default: "
                                                      "$MLFLOW_TRACKING_URI, else the SQLite registry in "
                                                      "$DEFECTOPS_HOME).")]
Threads = Annotated[int, typer.Option(help="CPU threads for decoding and inference.")]
Precision = Annotated[str, typer.Option(help="For models:/ and run roots: served (what verify_export published to "
                                             "Triton), fp32 or int8 (refused without a verified INT8 model).")]


def _resolve(ref: str, tracking_uri: str | None, precision: str = "served") -> ResolvedModel:

    from defectops.pipelines.config import home_dir
    from defectops.serving.model_ref import ModelRefError, resolve

    home = home_dir()
    uri = resolve_tracking_uri(tracking_uri, home)
    try:
        return resolve(ref, tracking_uri=uri, cache_dir=home / "cache", precision=precision)
    except ModelRefError as e:
        raise fail(str(e), EXIT_USAGE) from None


@predict_app.command("boards")
def boards(
    model: ModelRef,
    input: Annotated[Path, typer.Option("--input", help="Folder the list's paths are relative to (DeepPCB's "
                                                        "PCBData).")],
    list_file: Annotated[Path, typer.Option("--list", help="List file in DeepPCB's trainval.txt format.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the result files (one NNNNNNNN.txt per image).")],
    tracking_uri: TrackingUri = None,
    threads: Threads = 2,
    precision: Precision = "served",
) -> None:
    """Detect defects on board pairs: template differencing -> candidates -> classifier -> boxes.

    Writes one DeepPCB result file per image (x1,y1,x2,y2,confidence,name by descending confidence), prints
    images/s, and, when every listed annotation file exists, the DeepPCB mAP and F-score.
    """
    from defectops.serving.predict import predict_boards

    m = _resolve(model, tracking_uri, precision)
    try:
        lines = [x for x in list_file.read_text(encoding="utf-8").splitlines() if x.strip()] \
            if list_file.is_file() else []
        with progress_bars() as progress:
            tid = progress.add_task("detecting", total=len(lines) or None)
            r = predict_boards(m, input, list_file, out, threads=threads, progress=lambda n: progress.advance(tid, n))
    except (FileNotFoundError, ValueError) as e:
        raise fail(str(e), EXIT_USAGE) from None
    console.print(f"{r.images} images, {r.detections} detections in {r.seconds:.1f} s: "
                  f"[bold]{r.images_per_s:.1f} images/s[/] (decode, candidates, classification; {threads} threads); "
                  f"results in {out}")
    if r.score is not None:
        t = Table(title=f"DeepPCB metric (IoU > 0.33) with {m.source}", title_justify="left")
        for col in ("mAP", "F-score", "precision", "recall", "detections", "ground truth"):
            t.add_column(col, justify="right")
        s = r.score
        t.add_row(f"{s.map:.4f}", f"{s.fscore:.4f}", f"{s.precision:.4f}", f"{s.recall:.4f}", str(s.n_det),
                  str(s.n_gt))
        console.print(t)


@predict_app.command("images")
def images(
    model: ModelRef,
    input: Annotated[list[Path], typer.Option("--input", help="A folder (searched recursively) or image files; "
                                                              "repeat for several.")],
    out: Annotated[Path, typer.Option("--out", help="CSV file: path, predicted, confidence, p_<class>...")],
    tracking_uri: TrackingUri = None,
    threads: Threads = 2,
    precision: Precision = "served",
    maps: Annotated[Path | None, typer.Option("--maps", help="Anomaly models: also write each image's anomaly map "
                                                             "here (raw .npy and a .png heat map).")] = None,
) -> None:
    """Classify images with a folder-per-class model, preprocessed exactly as in training (same fit to square); or
    score them with an anomaly model (CSV: path, decision, score, normalised, p_defect; --maps for the maps)."""
    from defectops.serving.predict import predict_anomaly, predict_images
    from defectops.training.images import ImageError

    m = _resolve(model, tracking_uri, precision)
    paths = image_paths(list(input), "--input")
    if maps is not None and m.task != "anomaly":
        raise fail(f"--maps is for anomaly models; {m.source} is a {m.task} classifier", EXIT_USAGE)
    try:
        with progress_bars() as progress:
            tid = progress.add_task("scoring" if m.task == "anomaly" else "classifying", total=len(paths))
            if m.task == "anomaly":
                n, ips = predict_anomaly(m, paths, out, maps_dir=maps, threads=threads,
                                         progress=lambda k: progress.advance(tid, k))
            else:
                n, ips = predict_images(m, paths, out, threads=threads, progress=lambda k: progress.advance(tid, k))
    except ImageError as e:
        raise fail(str(e), EXIT_FAILURE) from None
    console.print(f"{n} images {'scored' if m.task == 'anomaly' else 'classified'} at {ips:.1f} images/s; results "
                  f"in {out}" + (f", maps in {maps}" if maps else ""))


def register(app: typer.Typer) -> None:
    """``defectops predict ...``."""
    app.add_typer(predict_app, name="predict")
