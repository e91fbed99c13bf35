"""FastAPI dependencies: settings, the ready inference service, and no unknown query parameters."""

from __future__ import annotations

import difflib

from fastapi import Request
from pydantic import BaseModel

from camserve.errors import InvalidParameterError, NotReadyError
from camserve.inference import InferenceService
from camserve.lifecycle import Phase
from camserve.settings import Settings


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


def known_query_only(request: Request) -> None:
    """422 for a query parameter the route does not take (`targets=5` would otherwise explain the top-1 class)."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = sorted(_query_names(dependant.query_params))
    for name in request.query_params:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; this route takes: {', '.join(known)}"
            raise InvalidParameterError(f"unknown query parameter {name!r}{hint}")


def _query_names(params: list) -> set[str]:
    """The query parameter names of a route; a parameter model (`Annotated[Options, Query()]`) gives its fields."""
    names: set[str] = set()
    for param in params:
        annotation = param.field_info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names.update(field.alias or name for name, field in annotation.model_fields.items())
        else:
            names.add(param.alias)
    return names
