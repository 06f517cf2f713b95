"""The HTTP face of :class:`serving.line.service.LineService` (FastAPI).

- ``POST /v1/inspect`` (multipart): ``image`` (the tested board), ``unit_id``, and for a board model ``template``
  (the image) or ``template_id`` (a name under ``--templates``); optional ``line_id``, ``position``. Returns the
  result (:class:`serving.line.results.InspectionResult`); 400 with the reason for bad input, 413 over the upload
  limit, 503 before a model is loaded.
- ``POST /v1/verdicts`` (JSON): a repair station's verification of a result (:meth:`LineService.record_verdict`).
- ``GET /v1/results/{transaction_id}``, ``GET /healthz`` (the process answers), ``GET /readyz`` (a model is loaded;
  names it), ``GET /metrics`` (Prometheus).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from defectops.serving.line.inspector import InspectionError
from defectops.serving.line.service import IMAGE_SUFFIXES, LineService


def _save_upload(upload: UploadFile, folder: Path, limit: int) -> Path:
    suffix = Path(upload.filename or "").suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise HTTPException(400, f"{upload.filename!r}: send a {', '.join(IMAGE_SUFFIXES)} image")
    dest = folder / f"{len(list(folder.iterdir()))}{suffix}"
    size = 0
    with dest.open("wb") as f:
        while chunk := upload.file.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"{upload.filename!r} is larger than {limit} bytes: send a smaller image or "
                                         "raise --max-upload-mb")
            f.write(chunk)
    return dest


def _record_verdict(service: LineService, doc: Any) -> JSONResponse:
    if not isinstance(doc, dict):
        raise HTTPException(400, "send a JSON object")
    try:
        return JSONResponse(service.record_verdict(doc), status_code=201)
    except LookupError as e:
        raise HTTPException(404, str(e)) from None
    except ValueError as e:
        raise HTTPException(400, str(e)) from None


def create_app(service: LineService) -> FastAPI:
    """The HTTP API of :class:`LineService`."""
    app = FastAPI(title="DefectOps line service", version="1")

    def saved(upload: UploadFile, folder: Path) -> Path:
        return _save_upload(upload, folder, service.cfg.max_upload_bytes)

    @app.post("/v1/inspect")
    def inspect(image: UploadFile = File(...), unit_id: str = Form(...), template: UploadFile | None = File(None),
                template_id: str | None = Form(None), line_id: str | None = Form(None),
                position: int | None = Form(None)) -> JSONResponse:
        if service.holder.current() is None:
            raise HTTPException(503, "no model loaded yet: see /readyz")
        with tempfile.TemporaryDirectory(prefix="defectops-line-") as tmp:
            folder = Path(tmp)
            tested = saved(image, folder)
            try:
                tpl = saved(template, folder) if template is not None else (
                    service.template_path(template_id) if template_id else None)
                result = service.inspect(tested, unit_id=unit_id, template=tpl, line_id=line_id, position=position,
                                         move=True)
            except InspectionError as e:
                raise HTTPException(400, str(e)) from None
        return JSONResponse(result.to_dict())

    @app.post("/v1/verdicts")
    async def verdicts(request: Request) -> JSONResponse:
        try:
            doc = await request.json()
        except ValueError:
            raise HTTPException(400, "send a JSON body") from None
        return _record_verdict(service, doc)

    @app.get("/v1/results/{transaction_id}")
    def result(transaction_id: str) -> JSONResponse:
        r = service.store.result(transaction_id)
        if r is None:
            raise HTTPException(404, f"no result {transaction_id}")
        return JSONResponse(r)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        cur = service.holder.current()
        if cur is None:
            return JSONResponse({"ready": False, "reason": "no model loaded yet"}, status_code=503)
        return JSONResponse({"ready": True, "model": cur.info.to_dict()})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
