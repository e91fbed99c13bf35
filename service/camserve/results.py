"""What a request gets back, and how a batch's outputs become it: top-k classes, pictures and scores.

`image_result` runs off the torch thread (numpy and PIL only), one image per call, so a request's images are
rendered in parallel: it renders each raw map straight to the picture size, blends overlays, and encodes heatmaps
as PNG and overlays as PNG, JPEG or WebP (bytes or base64 text).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from camserve.batches import ItemOutput
from camserve.cam import render
from camserve.models import ServedModel
from camserve.plan import Plan


@dataclass(frozen=True)
class Decoded:
    """One decoded image: its size, the input the model takes from it (`WorkItem.pixels`), and its full 8-bit
    picture (uint8 [C, H, W] in the model's channels) only while an overlay still needs it (a 12 MP photo is
    36 MB)."""

    width: int
    height: int
    model_input: object  # Tensor | EncodedJpeg
    pixels: Tensor | None = None


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class FaithfulnessScores:
    """How faithful one map is to the model (camserve.cam.faithfulness): drop = max(0, Y - O) / Y and increase =
    1[Y < O] for the image masked by the map; deletion and insertion AUC over `steps` steps."""

    drop: float
    increase: float
    deletion_auc: float
    insertion_auc: float
    steps: int


@dataclass(frozen=True)
class ClassMap:
    """One explained class of one image: the raw map (float32 [h, w], after ReLU, before normalization),
    the pictures asked for (PNG bytes or base64 text, per the request's `encoding`) and its faithfulness if asked."""

    index: int
    label: str
    score: float
    cam: np.ndarray
    heatmap: bytes | str | None = None
    overlay: bytes | str | None = None
    overlay_media_type: str | None = None
    faithfulness: FaithfulnessScores | None = None


@dataclass(frozen=True)
class ImageResult:
    width: int
    height: int
    probabilities: np.ndarray  # float32 [num_classes]
    predictions: list[Prediction]  # the top-k
    explanations: list[ClassMap] = field(default_factory=list)
    picture_size: tuple[int, int] | None = None  # (height, width) of heatmaps/overlays when not the image's


@dataclass(frozen=True)
class InferenceResult:
    model: str
    images: list[ImageResult]
    head: str = "softmax"  # what the probabilities are: softmax (sum to 1) or sigmoid (independent per class)
    method: str | None = None  # None: nothing was explained
    layers: tuple[str, ...] = ()
    counterfactual: bool = False


def image_result(plan: Plan, image: Decoded, output: ItemOutput, png_level: int) -> ImageResult:
    """One image's answer from its batch output (no torch work: this runs off the torch thread)."""
    resized = plan.pictures.size != "original"  # pictures not at the image's size report theirs
    return ImageResult(
        width=image.width,
        height=image.height,
        probabilities=output.probabilities.numpy(),
        predictions=top_k(plan.served, output.probabilities, plan.top_k, plan.request.threshold),
        explanations=_explanations(plan, image, output, png_level),
        picture_size=_picture_size(plan, image) if output.maps is not None and resized else None,
    )


def inference_result(plan: Plan, results: list[ImageResult], outputs: list[ItemOutput]) -> InferenceResult:
    """The request's answer from its images' answers."""
    head = plan.served.head
    if plan.explain is None:
        return InferenceResult(model=plan.served.name, images=results, head=head)
    return InferenceResult(
        model=plan.served.name,
        images=results,
        head=head,
        method=plan.explain.method,
        layers=tuple(outputs[0].layers),
        counterfactual=plan.explain.counterfactual,
    )


def top_k(served: ServedModel, probabilities: Tensor, k: int, threshold: float | None = None) -> list[Prediction]:
    """The k most probable classes, and every other class at or above `threshold`, most probable first; in numpy:
    this runs off the torch thread, where torch ops must not."""
    values = probabilities.numpy()
    order = np.argsort(-values, kind="stable")
    above = int((values >= threshold).sum()) if threshold is not None else 0
    indices = order[: max(k, above)]
    return [Prediction(index=int(i), label=served.labels[int(i)], score=float(values[i])) for i in indices]


def _explanations(plan: Plan, image: Decoded, output: ItemOutput, png_level: int) -> list[ClassMap]:
    if output.maps is None:
        return []
    request, pictures = plan.request, plan.pictures
    encode = _b64 if request.encoding == "base64" else _same
    size = _picture_size(plan, image)
    pixels = image.pixels.permute(1, 2, 0).numpy() if image.pixels is not None else None
    if pixels is not None:
        pixels = render.resize_pixels(pixels, size)
    fmt = pictures.overlay_format
    labels = plan.served.labels
    steps = plan.explain.faithfulness_steps if plan.explain is not None else None
    explanations = []
    for row, index in enumerate(output.classes):
        cam = output.maps[row].numpy()
        heatmap = overlay = media_type = None
        if request.heatmap or pixels is not None:
            picture = render.heatmap_image(cam, size)  # the raw map resized straight to the picture size
            if request.heatmap:
                heatmap = encode(render.encode_png(picture, png_level))
            if pixels is not None:
                blended = render.overlay_image(pixels, picture, pictures.colormap, pictures.alpha)
                overlay = encode(render.encode_picture(blended, fmt, png_level))
                media_type = render.OVERLAY_FORMATS[fmt]
        score = float(output.probabilities[index])
        faithful = _scores(output, row, steps)
        explanations.append(ClassMap(index, labels[index], score, cam, heatmap, overlay, media_type, faithful))
    return explanations


def _scores(output: ItemOutput, row: int, steps: int | None) -> FaithfulnessScores | None:
    if output.faithfulness is None or steps is None:
        return None
    drop, increase, deletion, insertion = output.faithfulness[row].tolist()
    return FaithfulnessScores(drop, increase, deletion, insertion, steps)


def _picture_size(plan: Plan, image: Decoded) -> tuple[int, int]:
    return render.picture_size(plan.pictures.size, (image.height, image.width), plan.served.input_size)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _same(data: bytes) -> bytes:
    return data
