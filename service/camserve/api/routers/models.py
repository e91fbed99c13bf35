"""The models this process serves."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path

from camserve.api.deps import get_service
from camserve.api.schemas import (
    ErrorResponse,
    LabelsResponse,
    LayerInfo,
    LayersResponse,
    ModelInfo,
    ModelsResponse,
    RuntimeBucket,
    RuntimeInfo,
)
from camserve.api.security import check_api_key
from camserve.inference import InferenceService
from camserve.models.runtimes import RuntimeChoice

router = APIRouter(tags=["models"], dependencies=[Depends(check_api_key)])


@router.get(
    "/models",
    response_model=ModelsResponse,
    summary="List served models with their input size, normalization and default CAM layer",
    responses={401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def list_models(service: Annotated[InferenceService, Depends(get_service)]) -> ModelsResponse:
    default = service.model(None).name
    return ModelsResponse(
        models=[
            ModelInfo(
                name=m.name,
                architecture=m.architecture,
                device=str(m.device),
                input_size=m.input_size,
                channels=m.channels,
                mean=list(m.mean),
                std=list(m.std),
                interpolation=m.interpolation,
                num_classes=m.num_classes,
                head=m.head,
                default_layer=m.default_layer,
                runtime=runtime_info(m.runtime),
                default=m.name == default,
            )
            for m in service
        ]
    )


@router.get(
    "/models/{name}/layers",
    response_model=LayersResponse,
    summary="The layers of a model that `layer=` can name, with their output shapes and layouts",
    responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def list_layers(
    name: Annotated[str, Path(description="a served model's name")],
    service: Annotated[InferenceService, Depends(get_service)],
) -> LayersResponse:
    served = service.model(name)
    if served.default_layer is None:  # no layer can be read (TorchScript)
        return LayersResponse(model=served.name, default_layer=None, layers=[])
    trace = served.engine.trace()
    layers = []
    for layer, shape in trace.shapes.items():
        layout = trace.layouts.get(layer)
        layers.append(
            LayerInfo(
                name=layer,
                module=trace.modules.get(layer, ""),
                shape=list(shape[1:]),
                spatial=layout is not None,
                layout=layout.kind if layout else None,
                grid=layout.grid if layout else None,
                prefix_tokens=layout.prefix if layout and layout.kind == "tokens" else None,
            )
        )
    return LayersResponse(model=served.name, default_layer=served.default_layer, layers=layers)


@router.get(
    "/models/{name}/labels",
    response_model=LabelsResponse,
    summary="A model's class labels in index order: what `target=` takes, by index or by exact label",
    responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def list_labels(
    name: Annotated[str, Path(description="a served model's name")],
    service: Annotated[InferenceService, Depends(get_service)],
) -> LabelsResponse:
    served = service.model(name)
    return LabelsResponse(model=served.name, labels=list(served.labels))


def runtime_info(choice: RuntimeChoice) -> RuntimeInfo:
    """The model's runtime as /models reports it: each bucket's batch sizes, backend and measured times."""
    return RuntimeInfo(
        mode=choice.mode,
        layer=choice.layer,
        buckets=[
            RuntimeBucket(batch_sizes=(low, bucket.largest), backend=bucket.backend, ms=dict(bucket.ms))
            for low, bucket in choice.ranges()
        ],
        not_used=choice.not_used,
        build_s=round(choice.build_s, 3),
        from_cache=choice.from_cache,
        building=choice.building,
    )
