"""FastAPI dependencies: settings and the ready inference service."""

from __future__ import annotations

from fastapi import Request

from service.errors import NotReadyError
from service.inference import InferenceService
from service.lifecycle import Phase
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_service(request: Request) -> InferenceService:
    """The inference service, or 503 while models load (or failed to). While the process drains it still serves:
    Kubernetes keeps sending requests until it has taken the instance out of its endpoints."""
    state = request.app.state
    if state.service is None:
        if state.lifecycle.phase is Phase.DRAINING:
            raise NotReadyError("the service is shutting down; retry on another instance")
        if state.lifecycle.error is not None:
            raise NotReadyError(f"the service cannot serve: {state.lifecycle.not_ready_reason()}")
        raise NotReadyError("the service is starting: models are still loading")
    return state.service
