"""The demo's HTTP side: one page and a small JSON API over a :class:`DemoSession`.

FastAPI + uvicorn (already in the lock through Prefect and MLflow) rather than Gradio: no
second web stack, no fonts or analytics fetched from the internet, and a box drawn by dragging,
which Gradio's image component does not offer. Every error a user can cause is HTTP 400 with
``{"error": "<one line>"}``, which the page shows; anything else is logged with its traceback and
answered 500 with a short line.

API (what :class:`gara.demo.client.DemoClient` calls)::

    GET  /                       the page
    GET  /api/health             {"ok": true}
    GET  /api/info               columns (with load errors), corruptions, severities, samples
    GET  /api/pictures/{id}.png  ?corruption=fog&severity=3: the picture as the models see it
    POST /api/uploads            {"name", "data": base64} -> {"id", "width", "height"}
    POST /api/segment            {"picture", "corruption", "severity", "box", "points",
                                  "point_labels", "annotation_id"} -> every column's answer
                                  and the ground truth it is scored on, masks as base64
                                  PNGs (0 / 255); predicted_iou and iou are fractions (the
                                  page shows them x 100, as reports do). An annotation_id
                                  without prompts prompts with that object's box.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from importlib import resources
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gara.demo.session import CLEAN, MAX_UPLOAD_PIXELS, DemoError, DemoSession

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # the page has no authentication: it listens on this machine only
MAX_BODY_BYTES = 64 * 1024 * 1024  # a 48 MB photo, base64-encoded in JSON


class UploadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("upload", max_length=255)
    data: str  # base64 of the file's bytes


class SegmentBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    picture: str
    corruption: str = CLEAN
    severity: int = 3
    box: list[float] | None = Field(None, min_length=4, max_length=4)
    points: list[list[float]] | None = None
    point_labels: list[int] | None = None
    annotation_id: int | None = None


def mask_png(mask: np.ndarray | None) -> str | None:
    """A bool mask as a base64 grayscale PNG (0 / 255), or None."""
    from PIL import Image

    if mask is None:
        return None
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def create_app(session: DemoSession):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="GaRA-SAM demo", docs_url=None, redoc_url=None, openapi_url=None)
    # Another site's page cannot reach this one through a name it points at 127.0.0.1 (DNS rebinding).
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=[HOST, "localhost"])
    page = resources.files("gara.demo").joinpath("page.html").read_text(encoding="utf-8")

    @app.middleware("http")
    async def _body_limit(request: Request, call_next):
        """Refuse an oversized body from its header, before it is read into memory."""
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > MAX_BODY_BYTES:
            return JSONResponse({"error": f"request of {int(size):,} bytes is over the demo's limit of "
                                          f"{MAX_BODY_BYTES:,}; downscale the photo first"}, status_code=400)
        return await call_next(request)

    @app.exception_handler(DemoError)
    async def _user_error(request: Request, exc: DemoError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where or 'request'}: {first.get('msg', 'invalid')}"
        return JSONResponse({"error": message}, status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("demo: %s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"},
                            status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/health")
    def health() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return session.describe()

    @app.get("/api/pictures/{picture_id}.png")
    def picture(picture_id: str, corruption: str = CLEAN, severity: int = 3) -> Response:
        from gara.registry.model import encode_image

        view = session.view(session.picture(picture_id), corruption, severity)
        # Ids name pictures of this server's run only (another --data or seed reuses them).
        return Response(encode_image(view.image), media_type="image/png",
                        headers={"Cache-Control": "no-store"})

    @app.post("/api/uploads")
    def upload(body: UploadBody) -> dict[str, Any]:
        try:
            data = base64.b64decode(body.data, validate=True)
        except (binascii.Error, ValueError):
            raise DemoError(f"{body.name}: data is not base64") from None
        added = session.add_upload(data, body.name)
        height, width = added.image.shape[:2]
        return {"id": added.id, "width": width, "height": height}

    @app.post("/api/segment")
    def segment(body: SegmentBody) -> dict[str, Any]:
        result = session.segment(body.picture, body.corruption, body.severity, body.box, body.points,
                                 body.point_labels, body.annotation_id)
        for column in result["columns"]:
            column["mask_png"] = mask_png(column.pop("mask"))
        if result["annotation"] is not None:
            result["annotation"]["mask_png"] = mask_png(result["annotation"].pop("mask"))
        return result

    return app


def serve(session: DemoSession, port: int) -> None:
    """Run the page on 127.0.0.1 until interrupted (Ctrl-C stops it cleanly)."""
    import uvicorn

    print(f"GaRA-SAM demo on http://{HOST}:{port}/ (uploads up to {MAX_UPLOAD_PIXELS:,} pixels; "
          "Ctrl-C stops it)", flush=True)
    uvicorn.run(create_app(session), host=HOST, port=port, log_level="warning")
