"""Liveness and readiness probes (never behind the API key).

Every probe reads the app's one Lifecycle through `lifecycle_of`: `/health/*` here, and the Open Inference
Protocol's `/v2/health/*` and model readiness (routers/oip_v2.py), so they cannot disagree.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from camserve.api.schemas import ErrorResponse, HealthResponse
from camserve.lifecycle import Lifecycle

router = APIRouter(prefix="/health", tags=["health"])


def lifecycle_of(request: Request) -> Lifecycle:
    """The app's Lifecycle (loading, ready, failed, draining, broken)."""
    return request.app.state.lifecycle


@router.get(
    "/live",
    response_model=HealthResponse,
    summary="Liveness: 200 while the process can serve, 503 after a fatal device error (restart it)",
    responses={503: {"model": ErrorResponse, "description": "the device failed: restart the process"}},
)
async def live(lifecycle: Annotated[Lifecycle, Depends(lifecycle_of)]) -> HealthResponse | JSONResponse:
    if not lifecycle.is_alive:
        return JSONResponse({"detail": lifecycle.not_ready_reason()}, status_code=503)
    return HealthResponse(status="ok")


@router.get(
    "/ready",
    response_model=HealthResponse,
    summary="Readiness: 200 once every model is loaded and warmed up, 503 before, while draining and once broken",
    responses={503: {"model": ErrorResponse, "description": "loading, failed, shutting down or device failed"}},
)
async def ready(lifecycle: Annotated[Lifecycle, Depends(lifecycle_of)]) -> HealthResponse | JSONResponse:
    if not lifecycle.is_ready:
        return JSONResponse({"detail": lifecycle.not_ready_reason()}, status_code=503)
    return HealthResponse(status="ready")
