"""Open Inference Protocol v2 (REST; KServe v2, Triton's HTTP protocol), with the binary tensor data extension.

A thin adapter: the request's one BYTES input (encoded image files) and its `parameters` (the `/explain` options)
become an InferenceRequest, which takes the one inference path (the same batching queue as `/predict`); the
result becomes the requested outputs: `probabilities` FP32 [N, num_classes] and, with an explanation,
`explained_class` INT64 [N, T], `cam` FP32 [N, T, h, w] (raw maps), `heatmap` and `overlay` BYTES [N, T] (PNG
files) and `faithfulness` FP32 [N, T, 4] (drop, increase, deletion AUC, insertion AUC, as `/explain` gives them).
Errors are `{"error": ...}` with the statuses of the one table in service.api.errors: 400 unreadable request or
image, 404 unknown model or version, 413 too large, 422 invalid parameter or output name, 503, 504.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response
from pydantic import ValidationError

from camserve import __version__
from camserve.api.deps import get_service
from camserve.api.inputs import decode_base64, parse_json
from camserve.api.schemas_v2 import (
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
    V2RequestInput,
    V2ServerMetadata,
    V2TensorMetadata,
)
from camserve.api.security import check_api_key
from camserve.errors import (
    InvalidInputError,
    InvalidParameterError,
    NotReadyError,
    PayloadTooLargeError,
    UnknownModelError,
    UnsupportedMediaError,
)
from camserve.inference import (
    ClassMap,
    ExplainRequest,
    ImagePayload,
    InferenceRequest,
    InferenceResult,
    InferenceService,
    RenderOptions,
)
from camserve.models import ServedModel
from camserve.numbers import whole_number

VERSION = "1"  # each served model has one version
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_MEDIA_TYPE = "application/octet-stream"

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
_NOT_READY: dict[int | str, dict[str, Any]] = {503: {"model": V2Error, "description": "not ready"}}

_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "An inference request: JSON, or with the binary tensor data extension the JSON header "
        f"({HEADER_LENGTH} bytes) followed by the binary data of the inputs that set `binary_data_size`.",
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/V2InferenceRequest"},
                "example": V2InferenceRequest.model_config["json_schema_extra"]["examples"][0],  # type: ignore[index]
            },
            BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


# -- health and metadata ----------------------------------------------------------------------
@health.get("", response_model=V2ServerMetadata, summary="OIP v2: server metadata")
async def server_metadata() -> V2ServerMetadata:
    return V2ServerMetadata(name="camserve", version=__version__, extensions=["binary_tensor_data"])


@health.get(
    "/health/live",
    summary="OIP v2: liveness (200 while the process can serve; 503 once its device failed)",
    response_class=Response,  # the protocol's health answers are the status alone, with an empty body
)
async def live(request: Request) -> Response:
    lifecycle = request.app.state.lifecycle
    if not lifecycle.is_alive:
        raise NotReadyError(f"not live: {lifecycle.not_ready_reason()}")
    return Response(status_code=200)


@health.get(
    "/health/ready",
    summary="OIP v2: readiness (200 once models are loaded, 503 before and while draining)",
    responses=_NOT_READY,
    response_class=Response,
)
async def ready(request: Request) -> Response:
    lifecycle = request.app.state.lifecycle
    if not lifecycle.is_ready:
        raise NotReadyError(f"not ready: {lifecycle.not_ready_reason()}")
    return Response(status_code=200)


def _model(service: InferenceService, name: str, version: str | None) -> ServedModel:
    served = service.registry.get(name)
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
        platform="pytorch",
        inputs=[V2TensorMetadata(name=INPUT, datatype="BYTES", shape=[-1])],
        outputs=outputs,
    )


@router.get(
    "/models/{name}",
    response_model=V2ModelMetadata,
    response_model_exclude_none=True,
    summary="OIP v2: model metadata",
    responses=_ERRORS,
)
async def model_metadata(name: ModelName, service: Annotated[InferenceService, Depends(get_service)]) -> Any:
    return _metadata(_model(service, name, None))


@router.get(
    "/models/{name}/versions/{version}",
    response_model=V2ModelMetadata,
    response_model_exclude_none=True,
    summary="OIP v2: model metadata",
    responses=_ERRORS,
)
async def model_version_metadata(
    name: ModelName, version: ModelVersion, service: Annotated[InferenceService, Depends(get_service)]
) -> Any:
    return _metadata(_model(service, name, version))


def _model_ready(request: Request, service: InferenceService, name: str, version: str | None) -> V2ModelReady:
    served = _model(service, name, version)
    lifecycle = request.app.state.lifecycle
    if not lifecycle.is_ready:
        raise NotReadyError(f"model {served.name!r} is not ready: {lifecycle.not_ready_reason()}")
    return V2ModelReady(name=served.name, ready=True)


@router.get("/models/{name}/ready", response_model=V2ModelReady, summary="OIP v2: model readiness", responses=_ERRORS)
async def model_ready(
    name: ModelName, request: Request, service: Annotated[InferenceService, Depends(get_service)]
) -> Any:
    return _model_ready(request, service, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready",
    response_model=V2ModelReady,
    summary="OIP v2: model readiness",
    responses=_ERRORS,
)
async def model_version_ready(
    name: ModelName, version: ModelVersion, request: Request, service: Annotated[InferenceService, Depends(get_service)]
) -> Any:
    return _model_ready(request, service, name, version)


# -- inference --------------------------------------------------------------------------------
@router.post(
    "/models/{name}/infer",
    response_model=V2InferenceResponse,
    summary="OIP v2: classify (and explain) encoded images; JSON or binary tensor data",
    openapi_extra=_INFER_BODY,
    responses=_ERRORS,
)
async def infer(name: ModelName, request: Request, service: Annotated[InferenceService, Depends(get_service)]) -> Any:
    return await _infer(request, service, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    response_model=V2InferenceResponse,
    summary="OIP v2: classify (and explain) encoded images; JSON or binary tensor data",
    openapi_extra=_INFER_BODY,
    responses=_ERRORS,
)
async def infer_version(
    name: ModelName, version: ModelVersion, request: Request, service: Annotated[InferenceService, Depends(get_service)]
) -> Any:
    return await _infer(request, service, name, version)


@dataclass(frozen=True)
class _Plan:
    """What the request asks for: the InferenceRequest, and each output by name with whether it goes binary."""

    inference: InferenceRequest
    outputs: dict[str, bool]


async def _infer(request: Request, service: InferenceService, name: str, version: str | None) -> Response:
    served = _model(service, name, version)
    settings = service.settings
    header, binary = _split(await request.body(), request.headers, settings.max_body_bytes)
    parsed = _parse_header(header)
    images = _images(parsed.inputs, binary, settings.max_images_per_request)
    plan = _plan(parsed, images, served)
    result = await service.infer(plan.inference, request.is_disconnected)
    return await asyncio.to_thread(_response, result, plan.outputs, parsed.id)


def _split(body: bytes, headers: Any, max_bytes: int) -> tuple[bytes, bytes]:
    """The JSON header and the binary section (empty without the extension), decompressed if it was."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("gzip", "deflate"):
        body = _inflate(body, encoding, max_bytes)
    elif encoding not in ("", "identity"):
        raise UnsupportedMediaError(f"unsupported Content-Encoding {encoding!r}; send gzip, deflate or identity")
    length = headers.get(HEADER_LENGTH.lower())
    if length is None:
        return body, b""
    size = whole_number(length)
    if size is None or size > len(body):
        raise InvalidInputError(f"{HEADER_LENGTH} {length!r} is not a length within the body of {len(body)} bytes")
    return body[:size], body[size:]


def _inflate(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """A gzip (one or more members) or deflate body, decompressed to at most `max_bytes`; 400 when it is cut
    off, corrupt or followed by other bytes, 413 when it inflates beyond the limit."""
    parts: list[bytes] = []
    size, rest = 0, body
    while True:
        inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            part = inflater.decompress(rest, max_bytes + 1 - size)
        except zlib.error as exc:
            raise InvalidInputError(f"the {encoding} request body cannot be decompressed: {exc}") from None
        size += len(part)
        if size > max_bytes or inflater.unconsumed_tail:
            raise PayloadTooLargeError(f"the decompressed request body exceeds {max_bytes} bytes")
        if not inflater.eof:
            raise InvalidInputError(f"the {encoding} request body is cut off")
        parts.append(part)
        rest = inflater.unused_data
        if not rest:
            return b"".join(parts)
        if encoding != "gzip" or not rest.startswith(b"\x1f\x8b"):  # only gzip chains members
            raise InvalidInputError(f"the {encoding} request body has bytes after its end")


def _parse_header(header: bytes) -> V2InferenceRequest:
    raw = parse_json(header, "the inference request is not valid JSON")
    try:
        return V2InferenceRequest.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInputError(f"invalid inference request: {_problems(exc)}") from None


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())


def _images(inputs: list[V2RequestInput], binary: bytes, max_images: int) -> list[ImagePayload]:
    """The encoded image files of the one BYTES input, from JSON `data` (base64) or from the binary section."""
    if len(inputs) != 1 or inputs[0].name != INPUT:
        names = [i.name for i in inputs]
        raise InvalidInputError(f"expected one input named {INPUT!r} (BYTES: encoded image files), got {names}")
    tensor = inputs[0]
    if tensor.datatype != "BYTES":
        raise InvalidInputError(f"input {INPUT!r} must be BYTES (encoded image files), got {tensor.datatype}")
    if any(d < 0 for d in tensor.shape):
        raise InvalidInputError(f"input {INPUT!r} has a negative dimension in its shape {tensor.shape}")
    count = math.prod(tensor.shape)
    if count > max_images:
        raise PayloadTooLargeError(f"{count} images in one request; the limit is {max_images}")
    parameters = tensor.parameters or {}
    if any(key.startswith("shared_memory") for key in parameters):
        raise InvalidInputError("shared memory inputs are not supported: send the data in the request")
    size = parameters.get("binary_data_size")
    if size is None:
        if binary:
            raise InvalidInputError(f"{len(binary)} bytes of binary data follow the header but no input claims them")
        if tensor.data is None:
            raise InvalidInputError(f"input {INPUT!r} has neither `data` nor the `binary_data_size` parameter")
        values = _flatten(tensor.data)
        if len(values) != count:
            raise InvalidInputError(
                f"input {INPUT!r} has {len(values)} elements; its shape {tensor.shape} says {count}"
            )
        where = f"inputs[0].data[{{}}] ({INPUT!r})"
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise InvalidInputError(f"{where.format(i)} must be a string: a base64-encoded image file")
        return [ImagePayload(decode_base64(value, where.format(i))) for i, value in enumerate(values)]
    if tensor.data is not None:
        raise InvalidInputError(f"input {INPUT!r} has both `data` and `binary_data_size`")
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise InvalidInputError(
            f"input {INPUT!r} says binary_data_size {size!r}; {len(binary)} bytes follow the JSON header"
        )
    return [ImagePayload(element) for element in _unpack_bytes(binary, count)]


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for value in data:
        flat.extend(_flatten(value) if isinstance(value, list) else [value])
    return flat


def _unpack_bytes(binary: bytes, count: int) -> list[bytes]:
    """A serialized BYTES tensor: per element a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    for i in range(count):
        if offset + 4 > len(binary):
            raise InvalidInputError(f"the binary data of {INPUT!r} ends before element {i} of {count}")
        (length,) = struct.unpack_from("<I", binary, offset)
        offset += 4
        if offset + length > len(binary):
            raise InvalidInputError(f"element {i} of {INPUT!r} says {length} bytes; fewer follow")
        elements.append(binary[offset : offset + length])
        offset += length
    if offset != len(binary):
        raise InvalidInputError(f"{len(binary) - offset} bytes left over after the {count} elements of {INPUT!r}")
    return elements


def _plan(parsed: V2InferenceRequest, images: list[ImagePayload], served: ServedModel) -> _Plan:
    """Translate `parameters` and `outputs` into the InferenceRequest and the outputs to return."""
    try:
        parameters = V2Parameters.model_validate(parsed.parameters or {})
    except ValidationError as exc:
        raise InvalidParameterError(f"invalid parameters: {_problems(exc)}") from None
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
    options_given = any(
        value is not None
        for value in (
            parameters.method,
            parameters.target,
            parameters.layer,
            parameters.faithfulness_steps,
            parameters.colormap,
            parameters.alpha,
            parameters.overlay_format,
            parameters.size,
        )
    ) or bool(parameters.overlay or parameters.faithfulness or parameters.counterfactual)
    explanation_outputs = requested is not None and any(name in requested for name in EXPLANATION_OUTPUTS)
    explain = parameters.explain if parameters.explain is not None else options_given or explanation_outputs
    if not explain and (explanation_outputs or options_given):
        raise InvalidParameterError("explanation outputs or options were requested with the parameter explain=false")
    for name, output in (("faithfulness", FAITHFULNESS), ("overlay", OVERLAY)):
        if getattr(parameters, name) is False and requested is not None and output in requested:
            raise InvalidParameterError(f"the {output} output was requested with the parameter {name}=false")
    faithfulness = parameters.faithfulness
    if faithfulness is None:
        faithfulness = requested is not None and FAITHFULNESS in requested
    if requested is None:
        names = [PROBABILITIES]
        if explain:
            names += [EXPLAINED_CLASS, CAM, HEATMAP] + ([OVERLAY] if parameters.overlay else [])
            names += [FAITHFULNESS] if faithfulness else []
        requested = dict.fromkeys(names, default_binary)
    defaults = RenderOptions()
    render = RenderOptions(
        overlay=OVERLAY in requested,
        colormap=parameters.colormap or defaults.colormap,
        alpha=defaults.alpha if parameters.alpha is None else parameters.alpha,
        overlay_format=parameters.overlay_format or defaults.overlay_format,
        size=defaults.size if parameters.size is None else parameters.size,
        heatmap=HEATMAP in requested,
        encoding="png",
    )
    explain_request = None
    if explain:
        explain_request = ExplainRequest(
            method=parameters.method or "gradcampp",
            targets=_split_list(parameters.target),
            layers=_split_list(parameters.layer),
            counterfactual=bool(parameters.counterfactual),
            faithfulness=faithfulness,
            faithfulness_steps=parameters.faithfulness_steps,
        )
    inference = InferenceRequest(images, model=served.name, top_k=1, explain=explain_request, render=render)
    return _Plan(inference, requested)


def _split_list(value: Any) -> list | None:
    """A list as given, or a comma-separated string split (OIP parameters are usually scalars)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()] or None
    return value if isinstance(value, list) else [value]


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
    entries, blobs = [], []
    for name, binary in outputs.items():
        datatype, array = _tensors(result, name)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = _serialize(array, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [base64.b64encode(value).decode("ascii") for value in array.ravel()]
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    body: dict[str, Any] = {"model_name": result.model, "model_version": VERSION, "outputs": entries}
    if request_id is not None:
        body["id"] = request_id
    header = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type=BINARY_MEDIA_TYPE, headers={HEADER_LENGTH: str(len(header))})


def _serialize(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(value)) + value for value in array.ravel())
    return array.astype("<f4" if datatype == "FP32" else "<i8").tobytes()
