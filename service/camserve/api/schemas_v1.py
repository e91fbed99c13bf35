"""Schemas of the KServe v1 protocol (`/v1/models/{name}:predict` and `:explain`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from camserve.api.examples import BASE64_STRING, JPEG_BASE64
from camserve.api.schemas import HEAD_FIELD, ExplainResult, PredictResult
from camserve.options import ExplainOptions, PictureOptions, PriorityOption, RawOption, TopKOption


class V1Base64(BaseModel):
    model_config = ConfigDict(extra="forbid")

    b64: str = Field(
        description="the image file, base64-encoded (a data: URL is accepted)",
        json_schema_extra={**BASE64_STRING, "minLength": 1},  # "" is a 400 ("... is empty"), not a 422
        examples=[JPEG_BASE64],
    )


class V1Instance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: V1Base64


class V1PredictRequest(TopKOption, PriorityOption):
    """`{"instances": [{"image": {"b64": "..."}}, ...]}`; `top_k` beside `instances`."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"instances": [{"image": {"b64": JPEG_BASE64}}], "top_k": 3}]}
    )

    instances: list[V1Instance] = Field(min_length=1, description="one instance per image")


class V1ExplainRequest(V1PredictRequest, ExplainOptions, PictureOptions, RawOption):
    """Instances as for `:predict`; the `/explain` options as fields beside `instances`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"instances": [{"image": {"b64": JPEG_BASE64}}], "method": "gradcampp", "target": [285]}]
        },
    )


class V1PredictResponse(BaseModel):
    predictions: list[PredictResult] = Field(description="one per instance, in order: what /predict gives per image")
    head: str = HEAD_FIELD


class V1ExplainResponse(BaseModel):
    explanations: list[ExplainResult] = Field(description="one per instance, in order: what /explain gives per image")
    head: str = HEAD_FIELD


class V1ModelStatus(BaseModel):
    name: str = Field(examples=["efficientnet-lite0"])
    ready: bool


class V1ModelList(BaseModel):
    models: list[str] = Field(examples=[["efficientnet-lite0"]])


class V1Error(BaseModel):
    error: str = Field(examples=["unknown model 'nope'; served models: efficientnet-lite0"])
