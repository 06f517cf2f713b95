"""``defectops serve publish`` (a Triton model repository from a model, to a folder or S3) and ``defectops infer``
(classify images with a model that Triton serves)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from defectops.core.layout import RUN
from defectops.pipelines.cli.common import EXIT_FAILURE, EXIT_USAGE, console, fail, image_paths
from defectops.pipelines.cli.predict import ModelRef, TrackingUri, _resolve

serve_app = typer.Typer(help="Publish models for Triton Inference Server.", no_args_is_help=True)

_REGISTRY_VERSION = re.compile(r"\(version (\d+)(?:, int8)?\)$")


def _name_and_version(ref: str, source: str) -> tuple[str | None, int | None]:
    """The registered model name and version a reference points at, when it says (registry URI or run root)."""
    from defectops.core.fsutil import read_json

    m = re.match(r"^models:/([^/@]+)", ref)
    if m:
        v = _REGISTRY_VERSION.search(source)
        return m.group(1), int(v.group(1)) if v else None
    reg = Path(ref).expanduser() / RUN.registration
    if reg.is_file():
        info = read_json(reg)
        version = str(info.get("version", ""))
        return info.get("registered_model"), int(version) if version.isdigit() else None
    return None, None


@serve_app.command("publish")
def publish(
    model: ModelRef,
    to: Annotated[str, typer.Option("--to", help="Triton model repository: a folder or s3://bucket/prefix "
                                                 "(S3 endpoint and credentials from the AWS_* environment).")],
    name: Annotated[str | None, typer.Option(help="Model name in the repository (default: the registered model's "
                                                  "name).")] = None,
    version: Annotated[int | None, typer.Option(help="Version folder (default: the registry version, else 1).",
                                                min=1)] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="max_batch_size (default 64).",
                                                       min=1)] = None,
    max_queue_delay_us: Annotated[int | None, typer.Option(help="Dynamic batching: longest wait for a fuller batch, "
                                                                "in microseconds (default 500).", min=0)] = None,
    instances: Annotated[int | None, typer.Option(help="Model instances per device (default 1).", min=1)] = None,
    kind: Annotated[str | None, typer.Option(help="Instance kind: cpu or gpu (KIND_CPU / KIND_GPU; default "
                                                  "cpu).")] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Build the Triton repository of a model (config.pbtxt, labels.txt, <version>/model.onnx) and publish it.

    Publishing writes each version folder first and config.pbtxt last, so a Triton polling the destination never
    loads a half-published model; versions already there are kept (the config's version policy picks those served).
    """
    from defectops.serving.config import InstanceKind, TritonConfig
    from defectops.serving.triton import (
        PublishError,
        check_model_name,
        onnx_input_shape,
        publish_repository,
        write_repository,
    )

    if kind is not None and kind.lower() not in ("cpu", "gpu"):
        raise fail(f"--kind {kind!r}: use cpu or gpu", EXIT_USAGE)
    if not to.startswith("s3://") and "://" in to:
        raise fail(f"--to {to!r}: use a folder or s3://bucket/prefix", EXIT_USAGE)
    m = _resolve(model, tracking_uri)
    ref_name, ref_version = _name_and_version(model, m.source)
    model_name = name or ref_name
    if not model_name:
        raise fail(f"{model} does not say which model it is: pass --name", EXIT_USAGE)
    try:
        check_model_name(model_name)
    except ValueError as e:
        raise fail(str(e), EXIT_USAGE) from None
    cfg = TritonConfig()
    if max_batch_size is not None:
        cfg.max_batch_size = max_batch_size
    if max_queue_delay_us is not None:
        cfg.max_queue_delay_us = max_queue_delay_us
    if instances is not None:
        cfg.instances = instances
    if kind is not None:
        cfg.instance_kind = InstanceKind(f"KIND_{kind.upper()}")
    v = version or ref_version or 1
    with tempfile.TemporaryDirectory(prefix="defectops-triton-") as tmp:
        try:
            write_repository(Path(tmp), model_name, m.onnx_path, m.classes, onnx_input_shape(m.onnx_path), cfg,
                             version=v)
        except ValueError as e:
            raise fail(str(e), EXIT_USAGE) from None
        try:
            result = publish_repository(Path(tmp), to)
        except PublishError as e:
            raise fail(str(e), EXIT_FAILURE) from None
    console.print(f"published [bold]{escape(model_name)}[/] version {v} ({escape(m.source)}) to "
                  f"{escape(result.dest)}: {result.uploaded} files written, {result.skipped} unchanged")


def infer(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).",
                                                 show_default=False)],
    url: Annotated[str, typer.Option(help="Triton's address, host:port (HTTP 8000, gRPC 8001 by default).")],
    protocol: Annotated[str, typer.Option(help="http or grpc.")] = "http",
    model: Annotated[str | None, typer.Option(help="Model name (default: the only model the server has).")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write a CSV: path, predicted, confidence, p_<class>...")
                   ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per request.", min=1)] = 64,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the server.", min=0.1)] = 30.0,
) -> None:
    """Classify images with a model served by Triton, preprocessed exactly as the model expects; or score them with
    an anomaly model (decision at its threshold, raw and normalised score; a board model adds its boxes to --out).

    Prints path, class and confidence (anomaly models: path, decision, score, normalised); exit 2 on usage errors (bad
    arguments, unknown model), 1 on failures (server unreachable, model not ready, unreadable image).
    """
    import csv
    import io

    import numpy as np

    from defectops.core.fsutil import write_text
    from defectops.serving.client import PROTOCOLS, TritonClient, TritonClientError
    from defectops.training.images import ImageError

    if protocol not in PROTOCOLS:
        raise fail(f"--protocol {protocol!r}: use http or grpc", EXIT_USAGE)
    paths = image_paths(images)
    try:
        with TritonClient(url, model, protocol, timeout=timeout) as client:
            if client.task == "anomaly":
                _infer_anomaly(client, paths, batch_size, url, protocol, out)
                return
            probs, rows = [], []
            for i in range(0, len(paths), batch_size):
                r = client.classify_files(paths[i:i + batch_size])
                probs.append(r.probabilities)
                rows += list(zip(r.predicted, r.confidence.tolist(), strict=True))
            labels = client.labels
            served = client.model
    except TritonClientError as e:
        raise fail(str(e), EXIT_USAGE if e.usage else EXIT_FAILURE) from None
    except ImageError as e:
        raise fail(str(e), EXIT_FAILURE) from None
    p = np.concatenate(probs)
    t = Table(title=f"{served} at {url} ({protocol})", title_justify="left")
    t.add_column("path", overflow="fold")
    t.add_column("class")
    t.add_column("confidence", justify="right")
    for path, (cls, conf) in zip(paths, rows, strict=True):
        t.add_row(escape(str(path)), escape(cls), f"{conf:.4f}")
    console.print(t)
    if out is not None:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "predicted", "confidence", *[f"p_{c}" for c in labels]])
        for path, (cls, conf), row in zip(paths, rows, p, strict=True):
            w.writerow([str(path), cls, f"{conf:.6f}", *[f"{v:.6f}" for v in row]])
        write_text(out, buf.getvalue())
        console.print(f"{len(paths)} images; results in {escape(str(out))}")


def _infer_anomaly(client: Any, paths: list[Path], batch_size: int, url: str, protocol: str,
                   out: Path | None) -> None:
    """``defectops infer`` for an anomaly model: decision, raw and normalised score, and a board model's boxes from
    its maps (CSV as ``predict images``)."""
    import csv
    import io

    import numpy as np

    from defectops.core.fsutil import write_text
    from defectops.evaluation.anomaly import ScoreNormalization, anomaly_probabilities
    from defectops.serving.predict import map_boxes_json

    rule = client.anomaly.get("boxes") or {}
    parts = [client.score_files(paths[i:i + batch_size]) for i in range(0, len(paths), batch_size)]
    scores = np.concatenate([r.scores for r in parts]) if parts else np.zeros(0)
    boxes = [map_boxes_json(m[0], p, rule) for r, chunk in zip(parts, _chunks(paths, batch_size), strict=True)
             for m, p in zip(r.maps, chunk, strict=True)] if rule else []
    threshold = float(client.anomaly["threshold"])
    norm = ScoreNormalization.from_dict(client.anomaly["normalization"])
    normalised = norm.normalise(scores)
    p_defect = anomaly_probabilities(scores, norm)[:, 1]
    good = client.labels[0]
    bad = next((c for c in client.labels if c != good), "defect")
    decisions = [bad if s >= threshold else good for s in scores]
    t = Table(title=f"{client.model} at {url} ({protocol}), anomaly threshold {threshold:.5g}", title_justify="left")
    for col, justify in (("path", "left"), ("decision", "left"), ("score", "right"), ("normalised", "right")):
        t.add_column(col, justify=justify, overflow="fold" if col == "path" else "ellipsis")  # type: ignore[arg-type]
    for path, d, s, z in zip(paths, decisions, scores, normalised, strict=True):
        t.add_row(escape(str(path)), d, f"{s:.5g}", f"{z:+.3f}")
    console.print(t)
    if out is not None:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "decision", "score", "normalised", "p_defect", *(["boxes"] if rule else [])])
        for i, (path, d, s, z, p) in enumerate(zip(paths, decisions, scores, normalised, p_defect, strict=True)):
            w.writerow([str(path), d, f"{s:.6f}", f"{z:.6f}", f"{p:.6f}", *([boxes[i]] if rule else [])])
        write_text(out, buf.getvalue())
        console.print(f"{len(paths)} images; results in {escape(str(out))}")


def _chunks(paths: list[Path], n: int) -> list[list[Path]]:
    return [paths[i:i + n] for i in range(0, len(paths), n)]


def register(app: typer.Typer) -> None:
    """``defectops serve ...`` and ``defectops infer``."""
    app.add_typer(serve_app, name="serve")
    app.command("infer")(infer)
