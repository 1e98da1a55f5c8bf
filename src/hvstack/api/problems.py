"""Errors as RFC 9457 problem+json: every HvError and every validation failure.

The ``type`` is ``/problems/<slug>`` (resolvable later to documentation); the error's
data fields are extension members, so clients can read ``vm``, ``state`` and
``required`` without parsing the message.

A 5xx answer carries an ``error_id`` that the service's log line (with the traceback)
also carries; an unexpected exception shows only that id, never its text (which may
name host paths or internals). Every error answered is logged once: a refusal (4xx) at
INFO, a failure (5xx) at WARNING or, unexpected, at ERROR with its traceback.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hvstack.errors import HvError

MEDIA_TYPE = "application/problem+json"
log = logging.getLogger(__name__)


def problem_body(exc: HvError) -> dict[str, Any]:
    return {
        "type": f"/problems/{exc.slug}",
        "title": exc.title,
        "status": exc.http_status,
        "detail": exc.message,
        **dict(exc.data),
    }


def problem_response(exc: HvError) -> JSONResponse:
    return JSONResponse(problem_body(exc), status_code=exc.http_status, media_type=MEDIA_TYPE)


def _describe(errors: list[Any]) -> str:
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts)


def new_error_id() -> str:
    return uuid.uuid4().hex[:12]


def install(app: FastAPI) -> None:
    @app.exception_handler(HvError)
    async def on_hv_error(request: Request, exc: HvError) -> JSONResponse:
        if exc.http_status < 500:
            log.info("%s %s refused (%d %s): %s", request.method, request.url.path,
                     exc.http_status, exc.slug, exc)
            return problem_response(exc)
        error_id = new_error_id()
        log.warning("%s %s failed (error id %s): %s", request.method, request.url.path,
                    error_id, exc, exc_info=exc.http_status != 507)
        body = problem_body(exc)
        body["error_id"] = error_id
        return JSONResponse(body, status_code=exc.http_status, media_type=MEDIA_TYPE)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()
        ]
        body = {
            "type": "/problems/invalid-input",
            "title": "Invalid input",
            "status": 400,
            "detail": _describe(errors),
            "errors": errors,
        }
        return JSONResponse(body, status_code=400, media_type=MEDIA_TYPE)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        error_id = new_error_id()
        log.error("unexpected error in %s %s (error id %s)", request.method,
                  request.url.path, error_id, exc_info=exc)
        body = {"type": "/problems/internal", "title": "Internal error", "status": 500,
                "detail": f"internal error (error id {error_id}; the host service's log "
                          "has the details)",
                "error_id": error_id}
        return JSONResponse(body, status_code=500, media_type=MEDIA_TYPE)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {"type": "about:blank", "title": str(exc.detail), "status": exc.status_code,
                "detail": str(exc.detail)}
        return JSONResponse(body, status_code=exc.status_code, media_type=MEDIA_TYPE)
