"""FastAPI dependencies: settings and the ready inference service."""

from __future__ import annotations

from fastapi import Request

from service.errors import NotReadyError
from service.inference import InferenceService
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_service(request: Request) -> InferenceService:
    """The inference service, or 503 while models load or the process drains."""
    state = request.app.state
    if state.draining:
        raise NotReadyError("the service is shutting down; retry on another instance")
    if state.service is None:
        raise NotReadyError("the service is starting: models are still loading")
    return state.service
