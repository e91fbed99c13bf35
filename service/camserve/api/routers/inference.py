"""POST /predict and POST /explain."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from camserve.api.deps import get_service, get_settings, known_query_only
from camserve.api.examples import JPEG_BASE64
from camserve.api.inputs import read_images
from camserve.api.responses import explain_response, predict_response
from camserve.api.schemas import ErrorResponse, ExplainResponse, JsonExplainRequest, PredictResponse
from camserve.api.security import check_api_key
from camserve.inference import InferenceService
from camserve.options import ExplainOptions, ExplainQuery, PictureOptions, PredictOptions, pick
from camserve.plan import InferenceRequest
from camserve.settings import Settings

router = APIRouter(tags=["inference"], dependencies=[Depends(check_api_key), Depends(known_query_only)])


def _image_body(json_form: str) -> dict[str, Any]:
    """The request body's three forms for the OpenAPI document; `json_form` names the JSON form's schema."""
    return {
        "requestBody": {
            "required": True,
            "description": "One or more images in one of three forms.",
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "image": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}
                        },
                        "required": ["image"],
                    },
                },
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{json_form}"},
                    "example": {"images": [JPEG_BASE64], "top_k": 3},
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "application/dicom": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "undecodable image or bad base64"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key (when one is configured)"},
    404: {"model": ErrorResponse, "description": "unknown model"},
    413: {"model": ErrorResponse, "description": "image, pixel count, image count or body too large"},
    415: {"model": ErrorResponse, "description": "unsupported media type"},
    422: {"model": ErrorResponse, "description": "invalid parameter"},
    503: {"model": ErrorResponse, "description": "overloaded (Retry-After) or not ready"},
    504: {"model": ErrorResponse, "description": "timed out"},
}


@router.post(
    "/predict",
    response_model=PredictResponse,
    summary="Classify images: the top-k classes per image, with their probabilities (softmax or sigmoid per head)",
    openapi_extra=_image_body("JsonPredictRequest"),
    responses=_ERRORS,
)
async def predict(
    request: Request,
    service: Annotated[InferenceService, Depends(get_service)],
    settings: Annotated[Settings, Depends(get_settings)],
    query: Annotated[PredictOptions, Query()],
) -> dict:
    images, body = await read_images(request, settings.max_images_per_request)
    options = pick(PredictOptions, query, body)
    inference = InferenceRequest(
        images, model=options.model, top_k=options.top_k, priority=options.priority, threshold=options.threshold
    )
    result = await service.infer(inference, request.is_disconnected)
    return predict_response(result)


@router.post(
    "/explain",
    response_model=ExplainResponse,
    response_model_exclude_none=True,
    summary="Classify images and explain classes with class activation maps (heatmaps and overlays as base64 PNG)",
    openapi_extra=_image_body("JsonExplainRequest"),
    responses=_ERRORS,
)
async def explain(
    request: Request,
    service: Annotated[InferenceService, Depends(get_service)],
    settings: Annotated[Settings, Depends(get_settings)],
    query: Annotated[ExplainQuery, Query()],
) -> dict:
    images, body = await read_images(request, settings.max_images_per_request, JsonExplainRequest)
    options = pick(ExplainQuery, query, body)
    inference = InferenceRequest(
        images,
        model=options.model,
        top_k=options.top_k,
        priority=options.priority,
        threshold=options.threshold,
        explain=pick(ExplainOptions, options),
        pictures=pick(PictureOptions, options),
    )
    result = await service.infer(inference, request.is_disconnected)
    return await asyncio.to_thread(explain_response, result, options.raw)  # raw maps as lists: not on the event loop
