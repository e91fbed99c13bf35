"""One place that maps exceptions to HTTP statuses and `{"detail": ...}` bodies."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import errors
from service.models.errors import ModelConfigError

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


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _domain_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.CamserveError)
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, errors.OverloadedError) else None
    if isinstance(exc, errors.NotReadyError):
        headers = {"Retry-After": "5"}
    return error_response(status_for(exc), str(exc), headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ())]
        where = f"{loc[0]} parameter {'.'.join(loc[1:])!r}" if len(loc) > 1 else ".".join(loc) or "request"
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return error_response(422, "; ".join(problems) or "invalid request")


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    if isinstance(exc, ModelConfigError):
        return error_response(503, "the service is not ready: a model failed to load")
    return error_response(500, "internal error; the incident was logged")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(errors.CamserveError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
