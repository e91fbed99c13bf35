"""Liveness and readiness probes (never behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from camserve.api.schemas import ErrorResponse, HealthResponse

router = APIRouter(prefix="/health", tags=["health"])


@router.get(
    "/live",
    response_model=HealthResponse,
    summary="Liveness: 200 while the process can serve, 503 after a fatal device error (restart it)",
    responses={503: {"model": ErrorResponse, "description": "the device failed: restart the process"}},
)
async def live(request: Request) -> HealthResponse | JSONResponse:
    lifecycle = request.app.state.lifecycle
    if not lifecycle.is_alive:
        return JSONResponse({"detail": lifecycle.not_ready_reason()}, status_code=503)
    return HealthResponse(status="ok")


@router.get(
    "/ready",
    response_model=HealthResponse,
    summary="Readiness: 200 once every model is loaded and warmed up, 503 before, while draining and once broken",
    responses={503: {"model": ErrorResponse, "description": "loading, failed, shutting down or device failed"}},
)
async def ready(request: Request) -> HealthResponse | JSONResponse:
    lifecycle = request.app.state.lifecycle
    if not lifecycle.is_ready:
        return JSONResponse({"detail": lifecycle.not_ready_reason()}, status_code=503)
    return HealthResponse(status="ready")
