"""Schemas of the KServe v1 protocol (`/v1/models/{name}:predict` and `:explain`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from camserve.api.examples import BASE64_STRING, JPEG_BASE64
from camserve.api.schemas import ExplainResult, Integer, PredictResult
from camserve.cam.methods import METHOD_NAMES


class V1Base64(BaseModel):
    model_config = ConfigDict(extra="forbid")

    b64: str = Field(
        description="the image file, base64-encoded (a data: URL is accepted)",
        json_schema_extra=BASE64_STRING,
        examples=[JPEG_BASE64],
    )


class V1Instance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: V1Base64


class V1PredictRequest(BaseModel):
    """`{"instances": [{"image": {"b64": "..."}}, ...]}`; `top_k` beside `instances`."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"instances": [{"image": {"b64": JPEG_BASE64}}], "top_k": 3}]}
    )

    instances: list[V1Instance] = Field(min_length=1, description="one instance per image")
    top_k: Integer | None = Field(None, description="number of top predictions per image (default 5)")


class V1ExplainRequest(V1PredictRequest):
    """Instances as for `:predict`; the `/explain` options as fields beside `instances`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"instances": [{"image": {"b64": JPEG_BASE64}}], "method": "gradcampp", "target": [285]}]
        },
    )

    method: str | None = Field(None, description=f"one of {', '.join(METHOD_NAMES)} (or gradcam++); default gradcampp")
    target: list[Integer | str] | Integer | str | None = Field(
        None, description="classes to explain: indices or exact labels; default the top-1 prediction"
    )
    layer: list[str] | str | None = Field(None, description="target layers (dotted module paths); several = fusion")
    counterfactual: bool | None = None
    overlay: bool | None = None
    colormap: str | None = None
    alpha: float | None = None
    overlay_format: str | None = Field(None, description="overlay file format: png (default), jpeg, webp")
    size: Integer | str | None = Field(
        None, description="size of heatmaps and overlays: original (default), model, or a maximum side in pixels"
    )
    raw: bool | None = Field(None, description="also return the raw map at feature resolution")
    faithfulness: bool | None = Field(None, description="also score each map's faithfulness, as /explain does")
    faithfulness_steps: Integer | None = Field(None, description="deletion/insertion steps (needs faithfulness)")


class V1PredictResponse(BaseModel):
    predictions: list[PredictResult] = Field(description="one per instance, in order: what /predict gives per image")


class V1ExplainResponse(BaseModel):
    explanations: list[ExplainResult] = Field(description="one per instance, in order: what /explain gives per image")


class V1ModelStatus(BaseModel):
    name: str = Field(examples=["efficientnet-lite0"])
    ready: bool


class V1ModelList(BaseModel):
    models: list[str] = Field(examples=[["efficientnet-lite0"]])


class V1Error(BaseModel):
    error: str = Field(examples=["unknown model 'nope'; served models: efficientnet-lite0"])
