"""KServe v1 protocol: `GET /v1/models/{name}`, `POST /v1/models/{name}:predict` and `:explain`.

A thin adapter: instances -> InferenceRequest -> the one inference path -> `/predict`'s and `/explain`'s per-image
objects, as `{"predictions": [...]}` and `{"explanations": [...]}`. Errors are `{"error": ...}` (service.api.errors).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Request

from camserve.api.deps import get_service
from camserve.api.inputs import decode_base64
from camserve.api.responses import explain_result, predict_result
from camserve.api.schemas_v1 import (
    V1Error,
    V1ExplainRequest,
    V1ExplainResponse,
    V1Instance,
    V1ModelList,
    V1ModelStatus,
    V1PredictRequest,
    V1PredictResponse,
)
from camserve.api.security import check_api_key
from camserve.inference import InferenceService
from camserve.options import ExplainOptions, PictureOptions, pick
from camserve.plan import ImagePayload, InferenceRequest

router = APIRouter(prefix="/v1", tags=["kserve-v1"], dependencies=[Depends(check_api_key)])

ModelName = Annotated[str, Path(description="a served model's name", examples=["efficientnet-lite0"])]
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": V1Error, "description": description}
    for status, description in {
        400: "bad base64 or undecodable image",
        401: "missing or wrong API key (when one is configured)",
        404: "unknown model",
        413: "image, pixel count, image count or body too large",
        422: "invalid parameter or request body",
        503: "overloaded (Retry-After) or not ready",
        504: "timed out",
    }.items()
}


def _images(instances: list[V1Instance]) -> list[ImagePayload]:
    return [ImagePayload(decode_base64(x.image.b64, f"instances[{i}].image.b64")) for i, x in enumerate(instances)]


@router.get("/models", response_model=V1ModelList, summary="KServe v1: served models", responses=_ERRORS)
async def list_models(service: Annotated[InferenceService, Depends(get_service)]) -> V1ModelList:
    return V1ModelList(models=[m.name for m in service])


@router.post(
    "/models/{name}:predict",
    response_model=V1PredictResponse,
    summary="KServe v1: classify instances (top-k per image)",
    responses=_ERRORS,
)
async def predict(
    name: ModelName,
    body: V1PredictRequest,
    request: Request,
    service: Annotated[InferenceService, Depends(get_service)],
) -> dict:
    inference = InferenceRequest(
        _images(body.instances), model=name, top_k=body.top_k, priority=body.priority, threshold=body.threshold
    )
    result = await service.infer(inference, request.is_disconnected)
    return {"predictions": [predict_result(image) for image in result.images], "head": result.head}


@router.post(
    "/models/{name}:explain",
    response_model=V1ExplainResponse,
    response_model_exclude_none=True,
    summary="KServe v1: classify and explain instances with class activation maps",
    responses=_ERRORS,
)
async def explain(
    name: ModelName,
    body: V1ExplainRequest,
    request: Request,
    service: Annotated[InferenceService, Depends(get_service)],
) -> dict:
    images = _images(body.instances)
    inference = InferenceRequest(
        images,
        model=name,
        top_k=body.top_k,
        threshold=body.threshold,
        explain=pick(ExplainOptions, body),
        pictures=pick(PictureOptions, body),
        priority=body.priority,
    )
    result = await service.infer(inference, request.is_disconnected)
    explanations = await asyncio.to_thread(lambda: [explain_result(image, body.raw) for image in result.images])
    return {"explanations": explanations, "head": result.head}


@router.get("/models/{name}", response_model=V1ModelStatus, summary="KServe v1: model status", responses=_ERRORS)
async def model_status(
    name: ModelName, request: Request, service: Annotated[InferenceService, Depends(get_service)]
) -> V1ModelStatus:
    """The model's status. Bound after the verbs so that any other method on a verb path (OPTIONS, PUT...) meets
    the verb's route first and answers 405 `Allow: POST`, as GET does here."""
    model, _, verb = name.rpartition(":")
    if model and verb in ("predict", "explain"):  # `GET /v1/models/x:predict`: the verb exists, the method not
        raise HTTPException(405, f"{verb} takes POST, not {request.method}", headers={"Allow": "POST"})
    served = service.model(name)
    return V1ModelStatus(name=served.name, ready=request.app.state.lifecycle.is_ready)
