"""Schemas of the Open Inference Protocol v2 (REST), also called the KServe v2 or Triton HTTP protocol."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from camserve.api.examples import JPEG_BASE64
from camserve.api.schemas import Integer
from camserve.options import ExplainOptions, PictureOptions, PriorityOption

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


class V2ServerLive(BaseModel):
    live: bool


class V2ServerReady(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2Parameters(ExplainOptions, PictureOptions, PriorityOption):
    """The request's `parameters`: the `/explain` options (any of them asks for an explanation; `overlay` and
    `faithfulness` also add their outputs) and the standard `binary_data_output`. `target` and `layer` also take a
    comma-separated string (OIP parameters are usually scalars)."""

    model_config = ConfigDict(extra="forbid")

    explain: bool | None = Field(None, description="explain (default: when an explanation option or output is asked)")
    binary_data_output: bool | None = Field(
        None, description="binary tensor extension: every output not saying otherwise comes as binary data"
    )
    timeout: Integer | None = Field(None, description="accepted and ignored: the server's request timeout applies")

    @field_validator("target", "layer", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str) and "," in value:
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


#: Parameters whose presence asks for an explanation (booleans ask only when true).
ASKING_FIELDS = (frozenset(ExplainOptions.model_fields) | frozenset(PictureOptions.model_fields)) - {
    "overlay",
    "faithfulness",
    "counterfactual",
}


class V2RequestInput(BaseModel):
    """One input tensor. The document states what the server accepts (name `images`, BYTES, no negative
    dimension); the handler checks it and answers 400 with its own words, so these are schema-only."""

    name: str = Field(examples=[INPUT], json_schema_extra={"const": INPUT})
    shape: list[Integer] = Field(examples=[[1]], json_schema_extra={"items": {"type": "integer", "minimum": 0}})
    datatype: str = Field(examples=["BYTES"], json_schema_extra={"const": "BYTES"})
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
    inputs: list[V2RequestInput] = Field(min_length=1, json_schema_extra={"maxItems": 1})
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
