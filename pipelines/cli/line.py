"""``defectops line serve``: the inspection service at the line (``serving/line/``, ``docs/line.md``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from defectops.pipelines.cli.common import EXIT_FAILURE, EXIT_USAGE, console, fail, resolve_tracking_uri
from defectops.pipelines.cli.predict import TrackingUri

line_app = typer.Typer(help="Inspect boards at the line and feed the MES.", no_args_is_help=True)


def _grid(value: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise fail(f"--grid {value!r}: use ROWSxCOLS, e.g. 8x8", EXIT_USAGE) from None
    if rows < 1 or cols < 1:
        raise fail(f"--grid {value!r}: rows and columns must be at least 1", EXIT_USAGE)
    return rows, cols


def _connect(service: Any, mqtt: str | None, username: str | None, cfx: bool, webhook: str | None
             ) -> tuple[Any, Any]:
    """The configured receivers (MQTT, webhook) attached to ``service``, and the MQTT settings (the verdicts come in
    over the same broker); a one-line error for bad settings."""
    from defectops.serving.line import outlets

    m = w = None
    if mqtt is not None:
        host, _, port = mqtt.rpartition(":") if ":" in mqtt else (mqtt, "", "1883")
        if not host or not port.isdigit():
            raise fail(f"--mqtt {mqtt!r}: use HOST or HOST:PORT", EXIT_USAGE)
        m = outlets.MqttSettings(host, int(port), username, os.environ.get("DEFECTOPS_MQTT_PASSWORD"), cfx)
    if webhook is not None:
        secret = os.environ.get("DEFECTOPS_WEBHOOK_SECRET", "")
        if not webhook.startswith(("http://", "https://")) or not secret:
            raise fail("--webhook needs an http(s) URL and the signing secret in DEFECTOPS_WEBHOOK_SECRET", EXIT_USAGE)
        w = outlets.WebhookSettings(webhook, secret.encode("utf-8"))
    try:
        return outlets.connect(service, mqtt=m, webhook=w), m
    except (OSError, ValueError) as e:
        raise fail(f"could not set up the result receivers: {e}", EXIT_FAILURE) from None


@line_app.command("serve")
def serve(
    model: Annotated[str, typer.Option("--model", help="models:/<name>@champion (followed: a new version is swapped "
                                                       "in without dropping a request), models:/<name>/<version>, "
                                                       "a run root or an ONNX file.")],
    store: Annotated[Path, typer.Option(help="Folder for every inspected image, results.jsonl, verdicts.jsonl and "
                                             "the delivery spool.")],
    site: Annotated[str, typer.Option(help="Site name: the first level of the MQTT topics.")] = "site",
    line: Annotated[str, typer.Option("--line", help="Line id of the results (a request may name another).")] = "line1",
    templates: Annotated[Path | None, typer.Option(help="Folder of template images by id (<id>.png) for board "
                                                        "models.")] = None,
    watch: Annotated[Path | None, typer.Option(help="A camera's drop folder to inspect from (complete files only; "
                                                    "sidecar <stem>.json with unit_id, template_id).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8090,
    poll_s: Annotated[float, typer.Option("--poll-s", help="Seconds between checks for a new champion.", min=0.5)
                      ] = 10.0,
    grid: Annotated[str, typer.Option(help="Board regions that name a defect's location, ROWSxCOLS.")] = "8x8",
    threads: Annotated[int, typer.Option(help="Inference threads.", min=1)] = 2,
    max_upload_mb: Annotated[float, typer.Option(help="Largest image accepted over HTTP, MB.", min=0.1)] = 50.0,
    mqtt: Annotated[str | None, typer.Option(help="MQTT broker HOST[:PORT] for results, alarms and IPC-CFX "
                                                  "(<site>/<line>/...; password from DEFECTOPS_MQTT_PASSWORD).")
                    ] = None,
    mqtt_username: Annotated[str | None, typer.Option(help="MQTT user name.")] = None,
    cfx: Annotated[bool, typer.Option("--cfx/--no-cfx", help="Also publish IPC-CFX UnitsInspected over MQTT.")
                   ] = True,
    webhook: Annotated[str | None, typer.Option(help="MES endpoint to POST each result to (HMAC-signed; secret from "
                                                     "DEFECTOPS_WEBHOOK_SECRET).")] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Serve inspections over HTTP (POST /v1/inspect) and from a watched folder with the current champion; keep every
    image and result under --store; /healthz, /readyz, /metrics (Prometheus)."""
    import uvicorn

    from defectops.pipelines.config import home_dir
    from defectops.serving.line import outlets
    from defectops.serving.line.http import create_app
    from defectops.serving.line.service import LineConfig, LineService
    from defectops.serving.line.watch import FolderWatcher
    from defectops.serving.model_ref import ModelRefError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    home = home_dir()
    if templates is not None and not templates.is_dir():
        raise fail(f"--templates {templates} is not a folder", EXIT_USAGE)
    cfg = LineConfig(model=model, site=site, line_id=line, store=store,
                     tracking_uri=resolve_tracking_uri(tracking_uri, home), cache_dir=home / "cache",
                     templates=templates, poll_s=poll_s, threads=threads, grid=_grid(grid),
                     max_upload_bytes=int(max_upload_mb * 1024 * 1024))
    service = LineService(cfg)
    publisher, mqtt_settings = _connect(service, mqtt, mqtt_username, cfx, webhook)
    verdicts = outlets.VerdictListener(service, mqtt_settings) if mqtt_settings is not None else None
    try:
        service.refresh()
    except ModelRefError as e:
        raise fail(str(e), EXIT_USAGE) from None
    except (OSError, ValueError) as e:
        raise fail(f"could not load {model}: {e}", EXIT_FAILURE) from None
    cur = service.current().info
    console.print(f"serving [bold]{cur.name}[/] version {cur.version} ({cur.task}) on http://{host}:{port}; "
                  f"store {store}")
    if model.startswith("models:/"):
        service.start_following()
    watcher = FolderWatcher(service, watch) if watch is not None else None
    if watcher is not None:
        watcher.start()
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level="warning")
    finally:
        if watcher is not None:
            watcher.stop()
        service.stop()
        outlets.close(publisher)
        if verdicts is not None:
            verdicts.close()


def register(app: typer.Typer) -> None:
    """``defectops line ...``."""
    app.add_typer(line_app, name="line")
