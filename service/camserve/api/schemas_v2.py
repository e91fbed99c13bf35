"""Schemas of the Open Inference Protocol v2 (REST), also called the KServe v2 or Triton HTTP protocol."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from camserve.api.examples import JPEG_BASE64
from camserve.api.schemas import Integer
from camserve.cam.methods import METHOD_NAMES

INPUT = "images"
PROBABILITIES, EXPLAINED_CLASS, CAM, HEATMAP, OVERLAY = "probabilities", "explained_class", "cam", "heatmap", "overlay"
FAITHFULNESS = "faithfulness"  # FP32 [N, T, 4]: drop, increase, deletion AUC, insertion AUC
EXPLANATION_OUTPUTS = (EXPLAINED_CLASS, CAM, HEATMAP, OVERLAY, FAITHFULNESS)
OUTPUTS = (PROBABILITIES, *EXPLANATION_OUTPUTS)


class V2Error(BaseModel):
    error: str = Field(examples=["unknown model 'nope'; served models: efficientnet-lite0"])


class V2ServerMetadata(BaseModel):
    name: str = Field(examples=["camserve"])
    version: str
    extensions: list[str] = Field(examples=[["binary_tensor_data"]])


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(examples=["BYTES"])
    shape: list[int] = Field(description="-1: any size", examples=[[-1]])
    parameters: dict[str, Any] | None = None


class V2ModelMetadata(BaseModel):
    name: str = Field(examples=["efficientnet-lite0"])
    versions: list[str] = Field(examples=[["1"]])
    platform: str = Field(examples=["pytorch"])
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]
    parameters: dict[str, Any] | None = None


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2Parameters(BaseModel):
    """The request's `parameters`: the `/explain` options (any of them asks for an explanation) and the standard
    `binary_data_output`. `target` and `layer` take a list or a comma-separated string."""

    model_config = ConfigDict(extra="forbid")

    explain: bool | None = Field(None, description="explain (default: when an explanation option or output is asked)")
    method: str | None = Field(None, description=f"one of {', '.join(METHOD_NAMES)} (or gradcam++); default gradcampp")
    target: list[Integer | str] | Integer | str | None = Field(
        None, description="classes to explain: indices or exact labels; default the top-1 prediction"
    )
    layer: list[str] | str | None = Field(None, description="target layers (dotted module paths); several = fusion")
    counterfactual: bool | None = None
    overlay: bool | None = Field(
        None, description="also return the `overlay` output (RGB pictures in `overlay_format`)"
    )
    colormap: str | None = None
    alpha: float | None = None
    overlay_format: str | None = Field(
        None, description="file format of the `overlay` output: png (default), jpeg, webp (heatmaps stay PNG)"
    )
    size: Integer | str | None = Field(
        None, description="size of heatmaps and overlays: original (default), model, or a maximum side in pixels"
    )
    faithfulness: bool | None = Field(
        None, description="also return the `faithfulness` output (default: when that output is asked for)"
    )
    faithfulness_steps: Integer | None = Field(None, description="deletion/insertion steps of the faithfulness scores")
    binary_data_output: bool | None = Field(
        None, description="binary tensor extension: every output not saying otherwise comes as binary data"
    )
    timeout: Integer | None = Field(None, description="accepted and ignored: the server's request timeout applies")
    priority: Integer | None = Field(None, description="accepted and ignored")


class V2RequestInput(BaseModel):
    name: str = Field(examples=[INPUT])
    shape: list[Integer] = Field(examples=[[1]])
    datatype: str = Field(examples=["BYTES"])
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_size`: this input's bytes in the binary section after the JSON header"
    )
    data: list[Any] | None = Field(
        None,
        description="JSON form: the image files, each base64-encoded (flattened or nested by `shape`); "
        "required unless `binary_data_size` is given",
        examples=[[JPEG_BASE64]],
    )


class V2RequestOutput(BaseModel):
    name: str = Field(examples=[PROBABILITIES])
    parameters: dict[str, Any] | None = Field(None, description="`binary_data`: return this output as binary data")


class V2InferenceRequest(BaseModel):
    """The JSON body, or with the binary tensor extension the JSON header (`Inference-Header-Content-Length`
    bytes) followed by each binary input's bytes (BYTES elements: 4-byte little-endian length, then the bytes)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "inputs": [{"name": INPUT, "shape": [1], "datatype": "BYTES", "data": [JPEG_BASE64]}],
                    "parameters": {"method": "gradcampp"},
                    "outputs": [{"name": PROBABILITIES}, {"name": CAM}, {"name": HEATMAP}],
                }
            ]
        }
    )

    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="see V2Parameters")
    inputs: list[V2RequestInput] = Field(min_length=1)
    outputs: list[V2RequestOutput] | None = Field(
        None, description="outputs to return (default: probabilities, and with an explanation its outputs)"
    )


class V2ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_size` when this output's data follows the JSON header as binary data"
    )
    data: list[Any] | None = Field(None, description="row-major; BYTES elements (PNG files) base64-encoded")


class V2InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2ResponseOutput]
