"""Open Inference Protocol v2 (REST; KServe v2, Triton's HTTP protocol), with the binary tensor data extension.

A thin adapter: the request's one BYTES input (encoded image files) and its `parameters` (the `/explain` options)
become an InferenceRequest, which takes the one inference path (the same batching queue as `/predict`); the
result becomes the requested outputs: `probabilities` FP32 [N, num_classes] and, with an explanation,
`explained_class` INT64 [N, T], `cam` FP32 [N, T, h, w] (raw maps), `heatmap` and `overlay` BYTES [N, T] (PNG
files) and `faithfulness` FP32 [N, T, 4] (drop, increase, deletion AUC, insertion AUC, as `/explain` gives them).
The wire format (gzip, binary data, BYTES tensors, the response body) is camserve.api.oip_codec's. Each model
route is bound to both `/v2/models/{name}/...` and `/v2/models/{name}/versions/{version}/...`.
Errors are `{"error": ...}` with the statuses of the one table in camserve.api.errors: 400 unreadable request or
image, 404 unknown model or version, 413 too large, 422 invalid parameter or output name, 503, 504.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response
from pydantic import ValidationError

from camserve import __version__
from camserve.api import oip_codec
from camserve.api.deps import get_service, get_settings
from camserve.api.inputs import parse_json
from camserve.api.oip_codec import BINARY_MEDIA_TYPE, HEADER_LENGTH, OutputTensor
from camserve.api.routers.health import lifecycle_of
from camserve.api.schemas_v2 import (
    ASKING_FIELDS,
    CAM,
    EXPLAINED_CLASS,
    EXPLANATION_OUTPUTS,
    FAITHFULNESS,
    HEATMAP,
    INPUT,
    OUTPUTS,
    OVERLAY,
    PROBABILITIES,
    V2Error,
    V2InferenceRequest,
    V2InferenceResponse,
    V2ModelMetadata,
    V2ModelReady,
    V2Parameters,
    V2ServerLive,
    V2ServerMetadata,
    V2ServerReady,
    V2TensorMetadata,
)
from camserve.api.security import check_api_key
from camserve.errors import InvalidInputError, InvalidParameterError, NotReadyError, UnknownModelError
from camserve.inference import InferenceService
from camserve.lifecycle import Lifecycle
from camserve.models import ServedModel
from camserve.options import ExplainOptions, PictureOptions, describe_problems, pick
from camserve.plan import ImagePayload, InferenceRequest
from camserve.results import ClassMap, InferenceResult
from camserve.settings import Settings

VERSION = "1"  # each served model has one version

health = APIRouter(prefix="/v2", tags=["oip-v2"])
router = APIRouter(prefix="/v2", tags=["oip-v2"], dependencies=[Depends(check_api_key)])

ModelName = Annotated[str, Path(description="a served model's name", examples=["efficientnet-lite0"])]
ModelVersion = Annotated[str, Path(description="the model version: every model has one, `1`", examples=["1"])]
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": V2Error, "description": description}
    for status, description in {
        400: "unreadable request: not JSON, wrong input, shape or datatype, bad binary data, bad base64 or image",
        401: "missing or wrong API key (when one is configured)",
        404: "unknown model or version",
        413: "image, pixel count, image count or body too large",
        415: "unsupported Content-Encoding or image format",
        422: "invalid parameter or requested output",
        503: "overloaded (Retry-After) or not ready",
        504: "timed out",
    }.items()
}
_NOT_READY: dict[int | str, dict[str, Any]] = {503: {"model": V2Error, "description": "not ready (Retry-After)"}}

# The binary extension's Inference-Header-Content-Length is described here, not declared as a header parameter:
# its one valid value depends on the body, which a declared integer header cannot say (a fuzzer would pair any
# length with any body, and the server must refuse those with 400).
_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "An inference request: JSON; or, with the binary tensor data extension, the JSON header "
        f"({HEADER_LENGTH} bytes: that header gives its length) followed by the binary data of the inputs that set "
        f"`binary_data_size`; or, as {BINARY_MEDIA_TYPE} without {HEADER_LENGTH}, one encoded image file (the "
        f"input `{INPUT}` of shape [1]; a body whose first non-blank byte is `{{` is read as JSON).",
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/V2InferenceRequest"},
                "example": V2InferenceRequest.model_config["json_schema_extra"]["examples"][0],  # type: ignore[index]
            },
            BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary", "contentMediaType": "image/*"}},
        },
    },
}


def _model_paths(suffix: str = "") -> list[str]:
    """The unversioned and the versioned path of one model route, as KServe's v2 endpoints bind them."""
    return [f"/models/{{name}}{suffix}", f"/models/{{name}}/versions/{{version}}{suffix}"]


def _declare_version(version: ModelVersion) -> None:
    """Declares the `{version}` path parameter of the versioned paths (the handlers read it with _version)."""


def _version(request: Request) -> str | None:
    """The `{version}` path parameter, None on the unversioned path."""
    return request.path_params.get("version")


Version = Annotated[str | None, Depends(_version)]


def _bind(suffix: str, endpoint: Callable[..., Any], method: str, **options: Any) -> None:
    """Bind `endpoint` to both paths of a model route (one handler, one summary, two operations)."""
    for path in _model_paths(suffix):
        declare = [Depends(_declare_version)] if "{version}" in path else None
        router.add_api_route(path, endpoint, methods=[method], dependencies=declare, **options)


# -- health and metadata ----------------------------------------------------------------------
@health.get("", response_model=V2ServerMetadata, summary="OIP v2: server metadata")
async def server_metadata() -> V2ServerMetadata:
    return V2ServerMetadata(name="camserve", version=__version__, extensions=["binary_tensor_data"])


@health.get(
    "/health/live",
    response_model=V2ServerLive,
    summary="OIP v2: liveness (200 while the process can serve; 503 once its device failed)",
    responses=_NOT_READY,
)
async def live(lifecycle: Annotated[Lifecycle, Depends(lifecycle_of)]) -> V2ServerLive:
    """200 `{"live": true}` (KServe's body; Triton's clients read only the status) while `/health/live` is 200;
    otherwise 503 `{"error": reason}` with Retry-After, as KServe's own server answers."""
    if not lifecycle.is_alive:
        raise NotReadyError(f"not live: {lifecycle.not_ready_reason()}")
    return V2ServerLive(live=True)


@health.get(
    "/health/ready",
    response_model=V2ServerReady,
    summary="OIP v2: readiness (200 once models are loaded, 503 before and while draining)",
    responses=_NOT_READY,
)
async def ready(lifecycle: Annotated[Lifecycle, Depends(lifecycle_of)]) -> V2ServerReady:
    """200 `{"ready": true}` while `/health/ready` is 200; otherwise 503 `{"error": reason}` with Retry-After."""
    if not lifecycle.is_ready:
        raise NotReadyError(f"not ready: {lifecycle.not_ready_reason()}")
    return V2ServerReady(ready=True)


def _model(service: InferenceService, name: str, version: str | None) -> ServedModel:
    served = service.model(name)
    if version is not None and version != VERSION:
        raise UnknownModelError(f"model {name!r} has no version {version!r}; its only version is {VERSION!r}")
    return served


def _metadata(served: ServedModel) -> V2ModelMetadata:
    outputs = [V2TensorMetadata(name=PROBABILITIES, datatype="FP32", shape=[-1, served.num_classes])]
    if served.explainable:
        outputs += [
            V2TensorMetadata(name=EXPLAINED_CLASS, datatype="INT64", shape=[-1, -1]),
            V2TensorMetadata(name=CAM, datatype="FP32", shape=[-1, -1, -1, -1]),
            V2TensorMetadata(name=HEATMAP, datatype="BYTES", shape=[-1, -1]),
            V2TensorMetadata(name=OVERLAY, datatype="BYTES", shape=[-1, -1]),
            V2TensorMetadata(name=FAITHFULNESS, datatype="FP32", shape=[-1, -1, 4]),
        ]
    return V2ModelMetadata(
        name=served.name,
        versions=[VERSION],
        platform=served.platform,
        inputs=[V2TensorMetadata(name=INPUT, datatype="BYTES", shape=[-1])],
        outputs=outputs,
        parameters={"head": served.head},
    )


async def model_metadata(
    name: ModelName, version: Version, service: Annotated[InferenceService, Depends(get_service)]
) -> Any:
    return _metadata(_model(service, name, version))


_bind(
    "",
    model_metadata,
    "GET",
    response_model=V2ModelMetadata,
    response_model_exclude_none=True,
    summary="OIP v2: model metadata",
    responses=_ERRORS,
)


async def model_ready(
    name: ModelName,
    version: Version,
    lifecycle: Annotated[Lifecycle, Depends(lifecycle_of)],
    service: Annotated[InferenceService, Depends(get_service)],
) -> Any:
    """200 `{"name", "ready": true}` while `/health/ready` is 200; 404 unknown model or version; otherwise 503
    `{"error": reason}` (tritonclient and KServe's SDK read only the status here)."""
    served = _model(service, name, version)
    if not lifecycle.is_ready:
        raise NotReadyError(f"model {served.name!r} is not ready: {lifecycle.not_ready_reason()}")
    return V2ModelReady(name=served.name, ready=True)


_bind("/ready", model_ready, "GET", response_model=V2ModelReady, summary="OIP v2: model readiness", responses=_ERRORS)


# -- inference --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """What the request asks for: the InferenceRequest, and each output by name with whether it goes binary."""

    inference: InferenceRequest
    outputs: dict[str, bool]


async def infer(
    name: ModelName,
    version: Version,
    request: Request,
    service: Annotated[InferenceService, Depends(get_service)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> Any:
    served = _model(service, name, version)
    header, binary = oip_codec.split_body(await request.body(), request.headers, settings.max_body_bytes)
    parsed = _parse_header(header)
    files = oip_codec.input_files(parsed.inputs, binary, settings.max_images_per_request)
    plan = _plan(parsed, [ImagePayload(data) for data in files], served)
    result = await service.infer(plan.inference, request.is_disconnected)
    return await asyncio.to_thread(_response, result, plan.outputs, parsed.id)


_bind(
    "/infer",
    infer,
    "POST",
    response_model=V2InferenceResponse,
    summary="OIP v2: classify (and explain) encoded images; JSON or binary tensor data",
    openapi_extra=_INFER_BODY,
    responses=_ERRORS,
)


def _parse_header(header: bytes) -> V2InferenceRequest:
    raw = parse_json(header, "the inference request is not valid JSON")
    try:
        return V2InferenceRequest.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInputError(f"invalid inference request: {describe_problems(exc.errors())}") from None


def _plan(parsed: V2InferenceRequest, images: list[ImagePayload], served: ServedModel) -> _Plan:
    """Translate `parameters` and `outputs` into the InferenceRequest and the outputs to return."""
    try:
        parameters = V2Parameters.model_validate(parsed.parameters or {})
    except ValidationError as exc:
        raise InvalidParameterError(describe_problems(exc.errors())) from None
    default_binary = bool(parameters.binary_data_output)
    requested: dict[str, bool] | None = None
    if parsed.outputs is not None:
        requested = {}
        for output in parsed.outputs:
            if output.name not in OUTPUTS:
                raise InvalidParameterError(f"unknown output {output.name!r}; the outputs are {', '.join(OUTPUTS)}")
            extra = set(output.parameters or {}) - {"binary_data"}
            if extra:
                raise InvalidParameterError(f"output {output.name!r}: unsupported parameters {sorted(extra)}")
            binary = (output.parameters or {}).get("binary_data", default_binary)
            if not isinstance(binary, bool):
                raise InvalidParameterError(f"output {output.name!r}: binary_data must be true or false")
            requested[output.name] = binary
    given = parameters.model_fields_set
    options_given = bool(given & ASKING_FIELDS) or (parameters.overlay or parameters.faithfulness)
    options_given = options_given or parameters.counterfactual
    explanation_outputs = requested is not None and any(name in requested for name in EXPLANATION_OUTPUTS)
    explain = parameters.explain if parameters.explain is not None else options_given or explanation_outputs
    if not explain and (explanation_outputs or options_given):
        raise InvalidParameterError("explanation outputs or options were requested with the parameter explain=false")
    for name, output in (("faithfulness", FAITHFULNESS), ("overlay", OVERLAY)):
        if name in given and not getattr(parameters, name) and requested is not None and output in requested:
            raise InvalidParameterError(f"the {output} output was requested with the parameter {name}=false")
    faithfulness = (
        parameters.faithfulness if "faithfulness" in given else requested is not None and (FAITHFULNESS in requested)
    )
    if requested is None:
        names = [PROBABILITIES]
        if explain:
            names += [EXPLAINED_CLASS, CAM, HEATMAP] + ([OVERLAY] if parameters.overlay else [])
            names += [FAITHFULNESS] if faithfulness else []
        requested = dict.fromkeys(names, default_binary)
    pictures = pick(PictureOptions, parameters).model_copy(update={"overlay": OVERLAY in requested})
    explain_options = None
    if explain:
        explain_options = pick(ExplainOptions, parameters).model_copy(update={"faithfulness": faithfulness})
    inference = InferenceRequest(
        images,
        model=served.name,
        top_k=1,
        explain=explain_options,
        pictures=pictures,
        heatmap=HEATMAP in requested,
        encoding="png",
        priority=parameters.priority,
    )
    return _Plan(inference, requested)


# -- the response -----------------------------------------------------------------------------
def _tensors(result: InferenceResult, name: str) -> tuple[str, np.ndarray]:
    images = result.images
    if name == PROBABILITIES:
        return "FP32", np.stack([image.probabilities for image in images]).astype(np.float32)
    if name == EXPLAINED_CLASS:
        return "INT64", np.array([[e.index for e in image.explanations] for image in images], dtype=np.int64)
    if name == CAM:
        return "FP32", np.stack([np.stack([e.cam for e in image.explanations]) for image in images]).astype(np.float32)
    if name == FAITHFULNESS:
        return "FP32", np.array([[_scores(e) for e in image.explanations] for image in images], dtype=np.float32)
    pictures = [[getattr(e, name) for e in image.explanations] for image in images]
    array = np.empty((len(pictures), len(pictures[0])), dtype=object)
    for row, values in enumerate(pictures):
        array[row, :] = values
    return "BYTES", array


def _scores(entry: ClassMap) -> list[float]:
    scores = entry.faithfulness
    assert scores is not None  # asking for the output turns faithfulness on
    return [scores.drop, scores.increase, scores.deletion_auc, scores.insertion_auc]


def _response(result: InferenceResult, outputs: dict[str, bool], request_id: str | None) -> Response:
    """The JSON response, or the JSON header and the binary outputs after it (binary tensor data extension)."""
    tensors = [OutputTensor(name, *_tensors(result, name), binary=binary) for name, binary in outputs.items()]
    body, headers = oip_codec.encode_response(result.model, VERSION, request_id, tensors, {"head": result.head})
    return Response(body, media_type=headers.pop("content-type"), headers=headers)
