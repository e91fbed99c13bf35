"""POST /predict and POST /explain."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from camserve.api.deps import get_service, known_query_only
from camserve.api.examples import JPEG_BASE64
from camserve.api.inputs import read_images
from camserve.api.results import explain_response, predict_response
from camserve.api.schemas import ErrorResponse, ExplainResponse, JsonExplainRequest, PredictResponse
from camserve.api.security import check_api_key
from camserve.cam.methods import METHOD_NAMES
from camserve.cam.render import COLORMAPS, MAX_PICTURE_SIDE, OVERLAY_FORMATS
from camserve.inference import ExplainRequest, InferenceRequest, InferenceService, RenderOptions
from camserve.settings import MAX_FAITHFULNESS_STEPS, MIN_FAITHFULNESS_STEPS

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
                        "properties": {"image": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                        "required": ["image"],
                    },
                },
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{json_form}"},
                    "example": {"images": [JPEG_BASE64], "top_k": 3},
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
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

ModelParam = Annotated[
    str | None, Query(description="served model name; default: the default model", examples=["efficientnet-lite0"])
]
TopKParam = Annotated[int, Query(ge=1, description="number of top predictions per image", examples=[5])]


def _pick(json_value: Any, query_value: Any) -> Any:
    return query_value if json_value is None else json_value


def _as_list(value: Any) -> list | None:
    if value is None:
        return None
    return value if isinstance(value, list) else [value]


@router.post(
    "/predict",
    response_model=PredictResponse,
    summary="Classify images: top-k softmax probabilities per image",
    openapi_extra=_image_body("JsonPredictRequest"),
    responses=_ERRORS,
)
async def predict(
    request: Request,
    service: Annotated[InferenceService, Depends(get_service)],
    model: ModelParam = None,
    top_k: TopKParam = 5,
) -> dict:
    images, body = await read_images(request, service.settings.max_images_per_request)
    if body is not None:
        model, top_k = _pick(body.model, model), _pick(body.top_k, top_k)
    result = await service.infer(InferenceRequest(images, model=model, top_k=top_k), request.is_disconnected)
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
    model: ModelParam = None,
    method: Annotated[
        str, Query(description=f"CAM method: {', '.join(METHOD_NAMES)} (gradcam++ accepted)", examples=["gradcampp"])
    ] = "gradcampp",
    target: Annotated[
        list[str] | None,
        Query(
            description="class to explain: index or exact label; repeatable; default the top-1 prediction",
            examples=[["285", "tabby"]],
        ),
    ] = None,
    top_k: TopKParam = 5,
    layer: Annotated[
        list[str] | None,
        Query(
            description="target layer by dotted module path; repeatable (several = fusion); default per model",
            examples=[["_blocks.10", "_swish"]],
        ),
    ] = None,
    counterfactual: Annotated[
        bool, Query(description="explain what lowers the class score (-gradient)", examples=[False])
    ] = False,
    overlay: Annotated[
        bool, Query(description="also return the colormap blended over the image", examples=[True])
    ] = False,
    colormap: Annotated[str, Query(description=f"overlay colormap: {', '.join(COLORMAPS)}", examples=["jet"])] = "jet",
    alpha: Annotated[float, Query(ge=0.0, le=1.0, description="overlay opacity of the heatmap", examples=[0.5])] = 0.5,
    overlay_format: Annotated[
        str,
        Query(
            description=f"overlay file format: {', '.join(OVERLAY_FORMATS)} (heatmaps are always PNG)",
            examples=["jpeg"],
        ),
    ] = "png",
    size: Annotated[
        str,
        Query(
            description="size of heatmaps and overlays: original (the image's), model (the model input's) or a "
            f"maximum side in pixels (1-{MAX_PICTURE_SIDE}, aspect ratio kept, never enlarged)",
            examples=["original", "model", "512"],
        ),
    ] = "original",
    raw: Annotated[bool, Query(description="also return the raw map at feature resolution", examples=[False])] = False,
    faithfulness: Annotated[
        bool,
        Query(
            description="also score each map: Average Drop / Increase in Confidence and deletion / insertion AUC "
            "(1 + 2 x faithfulness_steps extra forwards per map)",
            examples=[True],
        ),
    ] = False,
    faithfulness_steps: Annotated[
        int | None,
        Query(
            ge=MIN_FAITHFULNESS_STEPS,
            le=MAX_FAITHFULNESS_STEPS,
            description="deletion/insertion steps of the faithfulness scores (needs faithfulness=true; default "
            "CAMSERVE_FAITHFULNESS_STEPS, 16)",
            examples=[16],
        ),
    ] = None,
) -> dict:
    images, body = await read_images(request, service.settings.max_images_per_request, JsonExplainRequest)
    targets, layers = target, layer
    if body is not None:  # JSON fields override query parameters of the same name
        model, method, top_k = _pick(body.model, model), _pick(body.method, method), _pick(body.top_k, top_k)
        counterfactual, raw = _pick(body.counterfactual, counterfactual), _pick(body.raw, raw)
        overlay, colormap, alpha = (
            _pick(body.overlay, overlay),
            _pick(body.colormap, colormap),
            _pick(body.alpha, alpha),
        )
        overlay_format, size = _pick(body.overlay_format, overlay_format), _pick(body.size, size)
        targets = _pick(_as_list(body.target), targets)
        layers = _pick(_as_list(body.layer), layers)
        faithfulness = _pick(body.faithfulness, faithfulness)
        faithfulness_steps = _pick(body.faithfulness_steps, faithfulness_steps)
    explain_request = InferenceRequest(
        images,
        model=model,
        top_k=top_k,
        explain=ExplainRequest(
            method=method,
            targets=targets,
            layers=layers,
            counterfactual=counterfactual,
            faithfulness=faithfulness,
            faithfulness_steps=faithfulness_steps,
        ),
        render=RenderOptions(overlay=overlay, colormap=colormap, alpha=alpha, overlay_format=overlay_format, size=size),
    )
    result = await service.infer(explain_request, request.is_disconnected)
    return await asyncio.to_thread(explain_response, result, raw)  # raw maps as lists: not on the event loop
