"""Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from camserve.api.security import check_api_key

router = APIRouter(tags=["metrics"], dependencies=[Depends(check_api_key)])


@router.get(
    "/metrics",
    summary="Prometheus metrics: requests, latency, queue depth, batch sizes, compute and load time",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    state = request.app.state
    if state.service is not None:
        for model, depth in state.service.queue_depths().items():
            state.metrics.queue_depth.labels(model).set(depth)
        for model, work in state.service.pending_forwards().items():
            state.metrics.pending_forwards.labels(model).set(work)
        for model, count in state.service.images_in_flight().items():
            state.metrics.inflight_images.labels(model).set(count)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
