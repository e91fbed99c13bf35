"""Pydantic models of the HTTP API (they also generate the OpenAPI document). Request options are declared once,
in `camserve.options`; the JSON bodies here add the images to them."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from camserve.api.examples import BASE64_STRING, JPEG_BASE64
from camserve.options import ExplainQuery, Integer, PredictOptions

__all__ = ["Integer"]


class ErrorResponse(BaseModel):
    detail: str = Field(examples=["unknown CAM method 'smoothgradcam'; use one of: gradcam, gradcampp, ..."])


class Prediction(BaseModel):
    index: int = Field(description="class index", examples=[285])
    label: str = Field(description="class label", examples=["Egyptian cat"])
    score: float = Field(
        description="probability: softmax (the scores of an image sum to 1), or sigmoid for a model whose `head` is "
        "sigmoid (multi-label or binary: each class on its own)",
        examples=[0.79],
    )


class PredictResult(BaseModel):
    width: int = Field(description="original image width in pixels (after EXIF orientation)")
    height: int = Field(description="original image height in pixels")
    predictions: list[Prediction]


HEAD_FIELD = Field(
    description="softmax: one label per image, scores sum to 1; sigmoid: independent labels (multi-label or binary)",
    examples=["softmax"],
)


class PredictResponse(BaseModel):
    model: str = Field(examples=["efficientnet-lite0"])
    head: str = HEAD_FIELD
    results: list[PredictResult] = Field(description="one result per image, in request order")


class Faithfulness(BaseModel):
    """How faithful the map is to the model (faithfulness=true). Y: the explained class's softmax probability
    (`score`); O: the same on the image whose pixels in [0, 1] are multiplied by the map (upsampled to the model's
    input, min-max normalized). Deletion / insertion: the most salient pixels first, `steps` steps."""

    drop: float = Field(description="Average Drop term: max(0, Y - O) / Y (lower is better)", examples=[0.12])
    increase: float = Field(description="Increase in Confidence term: 1 if Y < O else 0", examples=[0.0])
    deletion_auc: float = Field(
        description="area under the class probability as pixels are set to 0 in the normalized input (lower is better)",
        examples=[0.08],
    )
    insertion_auc: float = Field(
        description="area under the class probability as pixels are restored into a blurred copy (higher is better)",
        examples=[0.71],
    )
    steps: int = Field(description="deletion/insertion steps (faithfulness_steps)", examples=[16])


class Explanation(BaseModel):
    index: int = Field(description="explained class index", examples=[285])
    label: str = Field(examples=["Egyptian cat"])
    score: float = Field(description="probability of the explained class (softmax, or sigmoid per `head`)")
    heatmap: str = Field(
        description="base64 PNG (always lossless), 8-bit grayscale, width x height of the original image, or "
        "picture_width x picture_height when `size` resizes"
    )
    overlay: str | None = Field(
        None,
        description="base64 RGB picture in `overlay_format` (PNG by default): colormap blended over the image "
        "(overlay=true); same size as the heatmap",
    )
    overlay_media_type: str | None = Field(
        None, description="media type of the overlay: image/png, image/jpeg or image/webp", examples=["image/png"]
    )
    cam: list[list[float]] | None = Field(
        None, description="raw map at feature resolution after ReLU, before normalization (raw=true)"
    )
    faithfulness: Faithfulness | None = Field(None, description="faithfulness scores of the map (faithfulness=true)")


class ExplainResult(PredictResult):
    explanations: list[Explanation]
    picture_width: int | None = Field(None, description="width of heatmaps and overlays, only when `size` resizes")
    picture_height: int | None = Field(None, description="height of heatmaps and overlays, only when `size` resizes")


class ExplainResponse(BaseModel):
    model: str
    head: str = HEAD_FIELD
    method: str = Field(examples=["gradcampp"])
    layers: list[str] = Field(description="target layers the maps come from", examples=[["_swish"]])
    counterfactual: bool
    results: list[ExplainResult]


class RuntimeBucket(BaseModel):
    batch_sizes: tuple[int, int] = Field(description="[smallest, largest] batch size of the bucket", examples=[[2, 8]])
    backend: str = Field(description="eager, onnxruntime or compiled", examples=["onnxruntime"])
    ms: dict[str, float] = Field(
        description="median predict milliseconds of each candidate at the largest batch size, timed at warm-up",
        examples=[{"eager": 150.2, "onnxruntime": 61.7}],
    )


class RuntimeInfo(BaseModel):
    mode: str = Field(description="auto, eager, compiled or onnxruntime, as configured", examples=["auto"])
    layer: str | None = Field(description="where the model is split: the default layer", examples=["_swish"])
    buckets: list[RuntimeBucket] = Field(description="empty when every batch runs eagerly")
    not_used: dict[str, str] = Field(
        description="candidates that were not built or did not match eager, and why",
        examples=[{"compiled": "no C++ compiler on PATH"}],
    )
    build_s: float = Field(description="seconds spent exporting, building and timing at start-up")
    from_cache: bool = Field(description="true when the decision was read from the cache instead of timed")
    building: bool = Field(
        description="true while the model is served eagerly and its backend is built in the background "
        "(CAMSERVE_RUNTIME_BUILD); the buckets follow once it is checked and timed"
    )


class ModelInfo(BaseModel):
    name: str
    architecture: str
    device: str
    input_size: tuple[int, int] = Field(description="[height, width] the image is resized to")
    channels: int = Field(description="input channels: 3 (RGB) or 1 (luminance; 16-bit pictures and DICOM in full)")
    mean: list[float] = Field(description="normalization mean, one value per input channel")
    std: list[float] = Field(description="normalization standard deviation, one value per input channel")
    interpolation: str = Field(description="resampling filter of the resize: bilinear or bicubic (antialiased)")
    num_classes: int
    head: str = HEAD_FIELD
    default_layer: str | None = Field(description="CAM layer used by default; null when the model cannot explain")
    runtime: RuntimeInfo = Field(description="what runs predictions and the default layer's prefix (CAMSERVE_RUNTIME)")
    default: bool


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class LayerInfo(BaseModel):
    name: str = Field(description="dotted module path, as `layer=` takes it", examples=["blocks.11.norm1"])
    module: str = Field(description="the module's class", examples=["LayerNorm"])
    shape: list[int] = Field(description="output shape at the model's input size, batch dimension left out")
    spatial: bool = Field(description="true when `layer=` accepts it: a feature map or a token grid")
    layout: str | None = Field(
        None, description="nchw ([C, h, w]), nhwc ([h, w, C]) or tokens ([prefix + h*w, C]); null when not spatial"
    )
    grid: tuple[int, int] | None = Field(None, description="[h, w] of the map the layer gives")
    prefix_tokens: int | None = Field(None, description="tokens before the patch grid (class, registers), dropped")


class LayersResponse(BaseModel):
    model: str
    default_layer: str | None = Field(description="the layer explained when `layer=` is not given")
    layers: list[LayerInfo] = Field(description="every module that outputs a tensor, in the order they finish")


class HealthResponse(BaseModel):
    status: str = Field(examples=["ok"])


class JsonImages(BaseModel):
    """The images of a JSON body."""

    model_config = ConfigDict(extra="forbid")

    images: list[Annotated[str, Field(json_schema_extra=BASE64_STRING)]] = Field(
        min_length=1, description="base64-encoded image files (data: URLs accepted)", examples=[[JPEG_BASE64]]
    )


class JsonPredictRequest(JsonImages, PredictOptions):
    """/predict's JSON input form: base64 images plus, optionally, the same parameters as the query string (a field
    given here wins over the query parameter)."""


class JsonExplainRequest(JsonImages, ExplainQuery):
    """/explain's JSON input form: base64 images plus, optionally, the same parameters as the query string (a field
    given here wins over the query parameter)."""


class LabelsResponse(BaseModel):
    model: str = Field(examples=["efficientnet-lite0"])
    labels: list[str] = Field(
        description="class labels in index order: labels[i] names class i, as `target=` takes it (index or label)",
        examples=[["tench", "goldfish", "great white shark"]],
    )
