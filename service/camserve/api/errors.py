"""One place that maps exceptions to HTTP statuses; each protocol shapes the body its own way: `{"detail": ...}`
for the own API, `{"error": ...}` for KServe v1 (`/v1/...`) and the Open Inference Protocol v2 (`/v2...`)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from camserve import errors
from camserve.api.inputs import media_type
from camserve.device_faults import is_out_of_memory
from camserve.models.errors import ModelConfigError
from camserve.options import describe_problems

log = logging.getLogger(__name__)

STATUS_BY_ERROR: tuple[tuple[type[Exception], int], ...] = (
    (errors.InvalidInputError, 400),
    (errors.UnknownModelError, 404),
    (errors.PayloadTooLargeError, 413),
    (errors.UnsupportedMediaError, 415),
    (errors.InvalidParameterError, 422),
    (errors.OverloadedError, 503),
    (errors.NotReadyError, 503),
    (errors.RequestTimeoutError, 504),
)


def status_for(exc: Exception) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def is_inference_protocol(path: str) -> bool:
    """KServe v1 and Open Inference Protocol v2 routes, whose error bodies are `{"error": ...}`."""
    return path == "/v2" or path.startswith(("/v1/", "/v2/"))


def error_response(status: int, detail: str, headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    body = {"error": detail} if is_inference_protocol(path) else {"detail": detail}
    return JSONResponse(body, status_code=status, headers=headers)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.CamserveError)
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, errors.OverloadedError) else None
    if isinstance(exc, errors.NotReadyError):
        headers = {"Retry-After": "5"}
    return error_response(status_for(exc), str(exc), headers, request.url.path)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    media = media_type(request)
    if (
        media
        and media != "application/json"
        and not media.endswith("+json")
        and any(e.get("loc", ())[:1] == ("body",) for e in exc.errors())
    ):
        detail = f"unsupported Content-Type {media!r}; send application/json"
        return error_response(415, detail, path=request.url.path)
    problems = []
    status = 422
    for error in exc.errors():
        if error.get("type") == "json_invalid":  # a body that is not JSON is unreadable, not a bad parameter
            status = 400
            reason = (error.get("ctx") or {}).get("error", "not JSON")
            position = error.get("loc", ("body", "?"))[-1]
            problems.append(f"the JSON body is malformed: {reason} (at character {position})")
            continue
        problems.append(describe_problems([error]))
    return error_response(status, "; ".join(problems) or "invalid request", path=request.url.path)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None), request.url.path)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    if is_out_of_memory(exc):  # the worker words its own; this catches one raised anywhere else
        log.warning("out of memory: %s", exc)
        return error_response(503, "out of memory; retry shortly", {"Retry-After": "1"}, path=request.url.path)
    log.exception("unhandled error", exc_info=exc)
    if isinstance(exc, ModelConfigError):
        return error_response(503, "the service is not ready: a model failed to load", path=request.url.path)
    return error_response(500, "internal error; the incident was logged", path=request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(errors.CamserveError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
