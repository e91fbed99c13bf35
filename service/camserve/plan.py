"""A request checked once against its served model, before any image is decoded: `make_plan`.

An `InferenceRequest` is what every protocol translates its request into; `make_plan` looks the model up, checks
media types, counts, the method against the model, layers, classes and every budget (masked forwards, faithfulness
forwards, rendered pixels from the images' headers), and returns a `Plan` of parsed values: resolved layers and
class indices, the top-k, the faithfulness steps. Option values themselves were checked by `camserve.options`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from camserve.batches import ExplainPlan, is_heavy
from camserve.batching import NORMAL as NORMAL_PRIORITY
from camserve.cam import render
from camserve.cam.errors import MethodUnavailableError
from camserve.cam.faithfulness import forwards_per_explanation
from camserve.cam.family import Method
from camserve.cam.methods import get_method
from camserve.cam.rise import RISE
from camserve.errors import InvalidParameterError, PayloadTooLargeError
from camserve.images import check_media_type, header_size
from camserve.models import ModelRegistry, ServedModel
from camserve.options import DEFAULT_THRESHOLD, DEFAULT_TOP_K, MAX_TARGETS, ExplainOptions, PictureOptions
from camserve.settings import Settings


@dataclass(frozen=True)
class ImagePayload:
    """Raw bytes of one image as received, with the media type the client declared (if any)."""

    data: bytes
    content_type: str | None = None


@dataclass(frozen=True)
class InferenceRequest:
    """One request, whatever protocol it came in by: images, model, top-k, an explanation if asked for, and how its
    maps become pictures. `heatmap`: render the heatmap picture; `encoding`: pictures as PNG bytes or base64 text."""

    images: Sequence[ImagePayload]
    model: str | None = None
    top_k: int = DEFAULT_TOP_K
    explain: ExplainOptions | None = None
    pictures: PictureOptions = field(default_factory=PictureOptions)
    heatmap: bool = True
    encoding: Literal["png", "base64"] = "base64"
    priority: int = 0
    threshold: float | None = None


@dataclass(frozen=True)
class Plan:
    """An InferenceRequest checked against its model: what the batch runs (`explain`, `classes`) and renders, and
    what each image costs in forward-equivalents (`cost`; a backward counts as two forwards) in which lane (`heavy`:
    it runs extra forwards in chunks) at which priority (1 high, 2 normal, 3 low)."""

    request: InferenceRequest
    served: ServedModel
    top_k: int
    explain: ExplainPlan | None = None
    classes: list[int] | None = None
    cost: int = 1
    heavy: bool = False
    priority: int = NORMAL_PRIORITY
    #: each image's (width, height) from its header alone (None where it cannot be read before decoding)
    sizes: tuple[tuple[int, int] | None, ...] = ()

    @property
    def pictures(self) -> PictureOptions:
        return self.request.pictures


def make_plan(request: InferenceRequest, registry: ModelRegistry, settings: Settings) -> Plan:
    """Every check of a request against its model and the limits, in one place; raises the domain errors."""
    served = registry.get(request.model)
    if not request.images:
        raise InvalidParameterError("no image given: send at least one image")
    if len(request.images) > settings.max_images_per_request:
        raise PayloadTooLargeError(
            f"{len(request.images)} images in one request; the limit is {settings.max_images_per_request}"
        )
    for payload in request.images:
        check_media_type(payload.content_type)
    top_k = min(request.top_k, served.num_classes)
    priority = request.priority or NORMAL_PRIORITY
    headers = tuple(header_size(p.data) for p in request.images)  # a refusal costs no decoding
    explain = request.explain
    if explain is None:
        return Plan(request, served, top_k, priority=priority, sizes=headers)
    cam = get_method(explain.method)
    cam.check(counterfactual=explain.counterfactual, layers=bool(explain.layers))
    try:
        served.engine.check_method(cam)
    except MethodUnavailableError as exc:
        raise MethodUnavailableError(f"model {served.name!r}: {exc}") from None
    if explain.rise_masks is not None and isinstance(cam, RISE):  # other methods take no masks: it is not read
        cam = cam.with_masks(explain.rise_masks)
    steps = _faithfulness_steps(explain, settings)
    layers = served.engine.resolve_layers(list(explain.layers)) if explain.layers else None
    extra = _check_extra_forwards(served, cam, len(request.images), layers, settings)
    classes = [served.class_index(t) for t in explain.targets] if explain.targets else None
    targets = len(classes) if classes else 1
    measured = cam.reruns_after_layer and (layers is None or layers == (served.default_layer,))
    extra_per_image = extra * (served.rerun_fraction if measured else 1.0) / len(request.images)
    cost = 1 + (2 * targets if cam.needs_gradient else 0) + math.ceil(extra_per_image)
    if steps is not None:
        _check_faithfulness_budget(len(request.images), targets, steps, settings)
        cost += targets * forwards_per_explanation(steps)
    # an image whose header cannot be read is refused when decoded
    sizes = [(height, width) for width, height in filter(None, headers)]
    _check_render_budget(served, sizes, targets, request.pictures, settings)
    above, most = None, 1  # a sigmoid head without targets explains every class its threshold assigns
    if classes is None and served.head == "sigmoid":
        above = DEFAULT_THRESHOLD if request.threshold is None else request.threshold
        most = _most_maps(served, sizes, request.pictures, settings, len(request.images), steps)
    plan = ExplainPlan(
        method=cam.name,
        layers=layers,
        counterfactual=explain.counterfactual,
        faithfulness_steps=steps,
        above=above,
        most=most,
        rise_masks=explain.rise_masks if isinstance(cam, RISE) else None,
    )
    return Plan(request, served, top_k, plan, classes, cost, is_heavy(plan, extra_per_image), priority, headers)


def _most_maps(
    served: ServedModel,
    sizes: list[tuple[int, int]],
    pictures: PictureOptions,
    settings: Settings,
    images: int,
    steps: int | None,
) -> int:
    """How many classes above the threshold one image may explain: at most MAX_TARGETS and the class count, and
    only as many as the render and faithfulness budgets hold for every image (one always fits: it was checked)."""
    most = min(MAX_TARGETS, served.num_classes)
    while most > 1:
        try:
            _check_render_budget(served, sizes, most, pictures, settings)
            if steps is not None:
                _check_faithfulness_budget(images, most, steps, settings)
            break
        except PayloadTooLargeError:
            most -= 1
    return most


def _faithfulness_steps(explain: ExplainOptions, settings: Settings) -> int | None:
    """The deletion/insertion steps when faithfulness is asked for, else None; steps without it are a 422."""
    if not explain.faithfulness:
        if explain.faithfulness_steps is not None:
            raise InvalidParameterError("faithfulness_steps is only meaningful with faithfulness=true")
        return None
    return settings.faithfulness_steps if explain.faithfulness_steps is None else explain.faithfulness_steps


def _check_faithfulness_budget(images: int, targets: int, steps: int, settings: Settings) -> None:
    forwards = images * targets * forwards_per_explanation(steps)
    if forwards > settings.max_faithfulness_forwards:
        raise PayloadTooLargeError(
            f"faithfulness scores for this request need {forwards} model forwards ({images} images x {targets} "
            f"targets x (1 + 2 x {steps} steps)), above the limit of {settings.max_faithfulness_forwards}; "
            "send fewer images or targets, or lower faithfulness_steps"
        )


def _check_extra_forwards(
    served: ServedModel, cam: Method, images: int, layers: tuple[str, ...] | None, settings: Settings
) -> int:
    """The extra forwards of the request: Score-CAM and Ablation-CAM run one per image and layer channel,
    ReciproCAM one per image and layer cell, RISE one per image and mask (0 for other methods). More than the
    limit is refused."""
    names = (layers or served.engine.resolve_layers(None)) if cam.reads_layer else ()
    trace = served.engine.trace() if names else None
    channels = [trace.channels(name) for name in names] if trace else []
    grids = [trace.layout(name).grid for name in names] if trace else []
    cells = [h * w for h, w in grids]
    needed = cam.extra_forwards(images, channels, cells)
    limit = settings.max_masked_forwards
    if needed > limit and not names:  # RISE: masks of the input
        raise PayloadTooLargeError(
            f"{cam.name} would run {needed} extra forward passes ({images} image(s) x {needed // images} masks); the "
            f"limit per request is {limit} (CAMSERVE_MAX_MASKED_FORWARDS): send fewer images or fewer rise_masks"
        )
    if needed > limit:
        unit = cam.cost_unit
        per_image, sizes = (
            (sum(cells), [f"{h}x{w} cells" for h, w in grids])
            if unit == "cells"
            else (sum(channels), [f"{count} channels" for count in channels])
        )
        at = ", ".join(f"{name} ({size})" for name, size in zip(names, sizes, strict=True))
        raise PayloadTooLargeError(
            f"{cam.name} would run {needed} extra forward passes ({images} image(s) x {per_image} {unit} "
            f"of layer(s) {at}); the limit per request is {limit} (CAMSERVE_MAX_MASKED_FORWARDS): send fewer "
            f"images, choose a layer with fewer {unit}, or use a gradient method"
        )
    return needed


def _check_render_budget(
    served: ServedModel, images: list[tuple[int, int]], classes: int, pictures: PictureOptions, settings: Settings
) -> None:
    """413 when the pictures of images of these (height, width) would exceed CAMSERVE_MAX_RENDER_PIXELS."""
    per_pixel = classes * (4 if pictures.overlay else 1)
    sizes = [render.picture_size(pictures.size, image, served.input_size) for image in images]
    rendered = sum(height * width for height, width in sizes) * per_pixel
    if rendered > settings.max_render_pixels:
        raise PayloadTooLargeError(
            f"this request would render {rendered / 1e6:.1f} megapixels of heatmaps"
            f"{' and overlays' if pictures.overlay else ''}, above the limit of "
            f"{settings.max_render_pixels / 1e6:.1f}; send smaller images, fewer targets or no overlay"
        )
