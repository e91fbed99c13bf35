"""The FastAPI application: models load once in the background; routes serve through the workers."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from camserve import __version__
from camserve.api.errors import install_error_handlers
from camserve.api.metrics import Metrics
from camserve.api.middleware import BodyLimitMiddleware, MetricsMiddleware
from camserve.api.routers import explorer, health, inference, kserve_v1, metrics, models, oip_v2
from camserve.api.schemas import JsonExplainRequest, JsonPredictRequest
from camserve.api.schemas_v2 import V2InferenceRequest, V2Parameters
from camserve.batching import TorchThread
from camserve.inference import ClientDisconnectedError, InferenceService
from camserve.lifecycle import Lifecycle, Phase
from camserve.models import ModelRegistry
from camserve.models.background import build_runtimes
from camserve.settings import Settings, load_settings

log = logging.getLogger("camserve")

DESCRIPTION = """Classifies images and explains each decision with class activation maps
(Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM, Guided Grad-CAM).

Images can be sent as `multipart/form-data` (one or more `image` fields), as JSON
`{"images": ["<base64>", ...]}` or as the raw bytes of one image with an `image/*` (or `application/dicom`) content
type: JPEG, PNG, WebP, BMP, GIF, TIFF or DICOM (with the `dicom` extra).
Errors are JSON `{"detail": "..."}`.

The same models are also served through the KServe v1 protocol (`/v1/models/{name}:predict`, `:explain`) and the
Open Inference Protocol v2 (`/v2/...`, with the binary tensor data extension), whose errors are
`{"error": "..."}`; all three go through the same batching queue."""


def create_app(
    settings: Settings | None = None,
    registry: ModelRegistry | None = None,
    *,
    load_registry: Callable[[Settings], ModelRegistry] | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """Build the app. Models load in the background after start-up unless `registry` is given."""
    settings = settings or load_settings()
    metrics_ = Metrics()
    lifecycle = Lifecycle(on_change=lambda phase: metrics_.ready.set(1 if phase is Phase.READY else 0))
    thread = TorchThread()  # loads the models, then runs every batch

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.loaded = asyncio.Event()
        loader = asyncio.create_task(_load(app))
        try:
            yield
        finally:
            lifecycle.drain()
            for task in (loader, app.state.runtime_builder):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)  # also retrieves what a finished one raised
            if app.state.service is not None:
                await app.state.service.close()
            thread.close()

    async def _load(app: FastAPI) -> None:
        try:
            loaded = registry
            if loaded is None:

                def load_models() -> ModelRegistry:
                    try:
                        if load_registry is None:
                            return ModelRegistry.from_settings(
                                settings, defer_runtime=settings.runtime_build == "background"
                            )
                        return load_registry(settings)
                    finally:
                        app.state.load_finished.set()

                if settings.torch_threads:
                    await thread.run(torch.set_num_threads, settings.torch_threads)
                loaded = await thread.run(load_models)
            for model in loaded:
                metrics_.model_load_seconds.labels(model.name).set(model.load_seconds)
            service = InferenceService(
                loaded, settings, thread, on_batch=metrics_.observe_batch, on_fatal=lifecycle.broken
            )
            service.start()
            app.state.service = service
            lifecycle.loaded()
            log.info("ready: serving %s", ", ".join(m.name for m in loaded))
            app.state.runtime_builder = asyncio.create_task(build_runtimes(loaded, settings, thread))
        except Exception as exc:
            lifecycle.failed(exc)
            log.error("model loading failed: %s", exc)
            if on_load_error is not None:
                on_load_error(exc)
        finally:
            app.state.loaded.set()

    app = FastAPI(
        title="camserve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    #: Set once the torch thread is done loading models (at once when a registry is given): until then the
    #: process must not wait for that thread at exit.
    app.state.load_finished = threading.Event()
    app.state.torch_thread = thread
    if registry is not None:
        app.state.load_finished.set()
    app.state.metrics = metrics_
    app.state.service = None
    app.state.runtime_builder = None
    app.state.lifecycle = lifecycle

    install_error_handlers(app)

    async def _gone(_request: Request, _exc: Exception) -> Response:
        """The client went away (while sending its body or waiting): nginx's 499, nothing to log."""
        return Response(status_code=499)

    app.add_exception_handler(ClientDisconnectedError, _gone)
    app.add_exception_handler(ClientDisconnect, _gone)

    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(inference.router)
    app.include_router(metrics.router)
    app.include_router(kserve_v1.router)
    app.include_router(oip_v2.health)
    app.include_router(oip_v2.router)
    app.include_router(explorer.router)

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics_)

    def openapi() -> dict:
        """The generated document plus the JSON input form's schema (the body is read by hand)."""
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for model in (JsonPredictRequest, JsonExplainRequest, V2InferenceRequest, V2Parameters):
                found = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, definition in found.pop("$defs", {}).items():
                    schemas.setdefault(name, definition)
                schemas[model.__name__] = found
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
