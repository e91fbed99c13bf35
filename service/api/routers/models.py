"""The models this process serves."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from service.api.deps import get_service
from service.api.schemas import ErrorResponse, ModelInfo, ModelsResponse
from service.api.security import check_api_key
from service.inference import InferenceService

router = APIRouter(tags=["models"], dependencies=[Depends(check_api_key)])


@router.get(
    "/models",
    response_model=ModelsResponse,
    summary="List served models with their input size, normalization and default CAM layer",
    responses={401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def list_models(service: Annotated[InferenceService, Depends(get_service)]) -> ModelsResponse:
    registry = service.registry
    return ModelsResponse(
        models=[
            ModelInfo(
                name=m.name,
                architecture=m.architecture,
                device=str(m.device),
                input_size=m.input_size,
                mean=m.mean,
                std=m.std,
                interpolation=m.interpolation,
                num_classes=m.num_classes,
                default_layer=m.default_layer,
                default=m.name == registry.default_name,
            )
            for m in registry
        ]
    )
