"""The domain service behind every protocol's routes: validate -> decode -> queue -> render.

`InferenceService.infer` takes one typed `InferenceRequest` (whatever protocol it came in by), validates its
parameters once against the served model; decodes images (and resizes large ones for the model) on worker
threads, except that on a CUDA model JPEGs up to `GPU_DECODE_MAX_PIXELS` stay encoded for the batch to decode
with nvJPEG on the torch thread (never beside its kernels on another thread); sends one work item per image to
the model's worker queue; waits (bounded by the request timeout, abandoning work when the client goes away);
renders heatmaps and overlays and encodes them (PNG; overlays optionally JPEG or WebP) on worker threads again,
into a typed `InferenceResult`. The torch thread runs only the batch itself. Knows nothing of HTTP or of any
protocol's response shape; nothing of gradients.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from torch import Tensor

from camserve.cam import render
from camserve.cam.faithfulness import forwards_per_explanation
from camserve.cam.family import Method
from camserve.cam.methods import get_method
from camserve.errors import InvalidParameterError, NotReadyError, PayloadTooLargeError, RequestTimeoutError
from camserve.images import (
    EncodedJpeg,
    ImageLimits,
    check_media_type,
    decode_image,
    header_size,
    jpeg_for_gpu,
    resize_for_model,
)
from camserve.models import ModelRegistry, ServedModel
from camserve.settings import MAX_FAITHFULNESS_STEPS, MIN_FAITHFULNESS_STEPS, Settings
from camserve.worker import BatchObserver, BatchWorker, ExplainOptions, FatalObserver, ItemOutput, WorkItem

DisconnectCheck = Callable[[], Awaitable[bool]]
MAX_TARGETS = 20  # classes explained per image: each costs a backward round and a PNG per image
MAX_LAYERS = 8
# Images above this many pixels are resized for the model on the decoding thread (PIL); smaller ones on the
# torch thread as part of the batch. Measured on 2 vCPUs: torch's antialiased resize takes 2 ms for a
# 0.3-megapixel photo, PIL's 3-4.5 ms; at 2 MP torch takes 28 ms, PIL 13 ms; at 12 MP 282 vs 199 ms.
RESIZE_WHILE_DECODING_ABOVE = 1_000_000
# On a CUDA model, JPEGs up to this many pixels stay encoded until the batch decodes them on the GPU (and resizes
# them at once); larger ones are decoded and resized here on the CPU, so the device never holds a 40 MP image.
GPU_DECODE_MAX_PIXELS = 12_000_000


class ClientDisconnectedError(Exception):
    """The client went away before its answer was ready; its queued work was dropped."""


@dataclass(frozen=True)
class RenderOptions:
    """How explained maps turn into pictures, and how pictures are encoded (`png`: bytes, `base64`: text).
    `overlay_format`: the overlay's file format (`png`, `jpeg`, `webp`; heatmaps are always PNG). `size`:
    the pictures' size, `original` (the image's), `model` (the model input's) or a maximum side in pixels.
    The raw maps always come back (`ClassMap.cam`); whether a protocol returns them is its own choice."""

    overlay: bool = False
    colormap: str = "jet"
    alpha: float = 0.5
    heatmap: bool = True
    encoding: Literal["png", "base64"] = "base64"
    overlay_format: str = "png"
    size: str | int = "original"


@dataclass(frozen=True)
class Decoded:
    """One decoded image: its size, the input the model takes from it (`WorkItem.pixels`), and its full
    pixels only while an overlay still needs them (a 12 MP photo is 36 MB)."""

    width: int
    height: int
    model_input: Tensor | EncodedJpeg
    pixels: Tensor | None = None


@dataclass(frozen=True)
class ImagePayload:
    """Raw bytes of one image as received, with the media type the client declared (if any)."""

    data: bytes
    content_type: str | None = None


@dataclass(frozen=True)
class ExplainRequest:
    """What to explain: the CAM method, classes (default the top-1), layers (default the model's) and sign;
    `faithfulness` scores each map (`faithfulness_steps` deletion/insertion steps, default the setting's)."""

    method: str = "gradcampp"
    targets: Sequence[int | str] | None = None
    layers: Sequence[str] | None = None
    counterfactual: bool = False
    faithfulness: bool = False
    faithfulness_steps: int | None = None


@dataclass(frozen=True)
class InferenceRequest:
    """One request, whatever protocol it came in by: images, model, top-k, and an explanation if asked for."""

    images: Sequence[ImagePayload]
    model: str | None = None
    top_k: int = 5
    explain: ExplainRequest | None = None
    render: RenderOptions = field(default_factory=RenderOptions)


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class FaithfulnessScores:
    """How faithful one map is to the model (service.cam.faithfulness): drop = max(0, Y - O) / Y and increase =
    1[Y < O] for the image masked by the map; deletion and insertion AUC over `steps` steps."""

    drop: float
    increase: float
    deletion_auc: float
    insertion_auc: float
    steps: int


@dataclass(frozen=True)
class ClassMap:
    """One explained class of one image: the raw map (float32 [h, w], after ReLU, before normalization),
    the pictures asked for (PNG bytes or base64 text, per `RenderOptions.encoding`) and its faithfulness if asked."""

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
    method: str | None = None  # None: nothing was explained
    layers: tuple[str, ...] = ()
    counterfactual: bool = False


@dataclass(frozen=True)
class _Validated:
    """An InferenceRequest checked once against its model: resolved layers and class indices."""

    served: ServedModel
    top_k: int
    options: ExplainOptions | None
    classes: list[int] | None


class InferenceService:
    """Owns one BatchWorker per served model."""

    def __init__(
        self,
        registry: ModelRegistry,
        settings: Settings,
        on_batch: BatchObserver | None = None,
        on_fatal: FatalObserver | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        self.limits.apply_to_pil()
        self.workers = {
            m.name: BatchWorker(
                m,
                max_batch_size=settings.max_batch_size,
                max_queue=settings.max_queue,
                max_wait_ms=settings.max_wait_ms,
                on_batch=on_batch,
                on_fatal=on_fatal,
            )
            for m in registry
        }

    def start(self) -> None:
        for worker in self.workers.values():
            worker.start()

    async def close(self) -> None:
        await asyncio.gather(*(w.close() for w in self.workers.values()))

    def queue_depths(self) -> dict[str, int]:
        return {name: w.depth for name, w in self.workers.items()}

    def images_in_flight(self) -> dict[str, int]:
        """Per model, the images in the batch being computed now."""
        return {name: w.in_flight for name, w in self.workers.items()}

    # -- the one inference path ------------------------------------------------------------
    async def infer(self, request: InferenceRequest, is_disconnected: DisconnectCheck | None = None) -> InferenceResult:
        """Validate, decode, run through the model's batching queue, render: what every protocol calls."""
        checked = self.validate(request)
        served, options = checked.served, request.render
        keep_pixels = checked.options is not None and options.overlay
        if checked.options is not None:  # from the headers: a refusal costs no decoding (an unreadable one fails it)
            sizes = [header_size(payload.data) for payload in request.images]
            known = [(height, width) for width, height in filter(None, sizes)]
            self._check_render_budget(served, known, checked.classes, options)
        decoded = await self._decode(request.images, served, keep_pixels=keep_pixels)
        outputs = await self._run(served, decoded, checked.options, checked.classes, is_disconnected)
        steps = checked.options.faithfulness_steps if checked.options is not None else None
        images = await asyncio.to_thread(self._encode_all, served, decoded, outputs, checked.top_k, options, steps)
        if checked.options is None:
            return InferenceResult(model=served.name, images=images)
        return InferenceResult(
            model=served.name,
            images=images,
            method=checked.options.method,
            layers=tuple(outputs[0].layers),
            counterfactual=checked.options.counterfactual,
        )

    def validate(self, request: InferenceRequest) -> _Validated:
        """Every parameter check in one place, against the served model, before any image is decoded."""
        served = self.registry.get(request.model)
        if not request.images:
            raise InvalidParameterError("no image given: send at least one image")
        if len(request.images) > self.settings.max_images_per_request:
            raise PayloadTooLargeError(
                f"{len(request.images)} images in one request; the limit is {self.settings.max_images_per_request}"
            )
        for payload in request.images:
            check_media_type(payload.content_type)
        explain = request.explain
        if explain is not None and not served.explainable:
            raise InvalidParameterError(
                f"model {served.name!r} is a TorchScript model: it can predict but not explain (CAMs need module "
                "hooks); serve it as a torchvision or entry-point model to explain it"
            )
        top_k = self._check_top_k(request.top_k, served)
        if explain is None:
            return _Validated(served, top_k, None, None)
        cam = get_method(explain.method)
        cam.check(counterfactual=explain.counterfactual)
        options = request.render
        render.check_colormap(options.colormap)
        render.check_overlay_format(options.overlay_format)
        render.parse_picture_size(options.size)
        if not 0.0 <= options.alpha <= 1.0:
            raise InvalidParameterError(f"alpha must be between 0 and 1, got {options.alpha}")
        targets, layers = explain.targets, explain.layers
        if targets and len(targets) > MAX_TARGETS:
            raise InvalidParameterError(f"{len(targets)} targets requested; at most {MAX_TARGETS} per request")
        if layers and len(layers) > MAX_LAYERS:
            raise InvalidParameterError(f"{len(layers)} layers requested; at most {MAX_LAYERS} per request")
        steps = self._faithfulness_steps(explain)
        resolved_layers = served.engine.resolve_layers(list(layers), None) if layers else None
        self._check_extra_forwards(served, cam, len(request.images), resolved_layers)
        classes = [served.class_index(t) for t in targets] if targets else None
        if steps is not None:
            self._check_faithfulness_budget(len(request.images), len(classes) if classes else 1, steps)
        explain_options = ExplainOptions(
            method=cam.name, layers=resolved_layers, counterfactual=explain.counterfactual, faithfulness_steps=steps
        )
        return _Validated(served, top_k, explain_options, classes)

    # -- steps ----------------------------------------------------------------------------
    def _faithfulness_steps(self, explain: ExplainRequest) -> int | None:
        """The deletion/insertion steps when faithfulness is asked for, else None; a bad combination is a 422."""
        steps = explain.faithfulness_steps
        if not explain.faithfulness:
            if steps is not None:
                raise InvalidParameterError("faithfulness_steps is only meaningful with faithfulness=true")
            return None
        if steps is None:
            return self.settings.faithfulness_steps
        if isinstance(steps, bool) or not MIN_FAITHFULNESS_STEPS <= steps <= MAX_FAITHFULNESS_STEPS:
            raise InvalidParameterError(
                f"faithfulness_steps must be between {MIN_FAITHFULNESS_STEPS} and {MAX_FAITHFULNESS_STEPS}, got {steps}"
            )
        return steps

    def _check_faithfulness_budget(self, images: int, targets: int, steps: int) -> None:
        forwards = images * targets * forwards_per_explanation(steps)
        if forwards > self.settings.max_faithfulness_forwards:
            raise PayloadTooLargeError(
                f"faithfulness scores for this request need {forwards} model forwards ({images} images x {targets} "
                f"targets x (1 + 2 x {steps} steps)), above the limit of {self.settings.max_faithfulness_forwards}; "
                "send fewer images or targets, or lower faithfulness_steps"
            )

    def _check_extra_forwards(
        self, served: ServedModel, cam: Method, images: int, layers: tuple[str, ...] | None
    ) -> None:
        """Score-CAM and Ablation-CAM run one forward per image and layer channel: refuse more than the limit."""
        names = layers or served.engine.resolve_layers(None)
        trace = served.engine.trace()
        channels = [trace.channels(name) for name in names]
        needed = cam.extra_forwards(images, channels)
        limit = self.settings.max_masked_forwards
        if needed > limit:
            at = ", ".join(f"{name} ({count} channels)" for name, count in zip(names, channels, strict=True))
            raise PayloadTooLargeError(
                f"{cam.name} would run {needed} extra forward passes ({images} image(s) x {sum(channels)} channels "
                f"of layer(s) {at}); the limit per request is {limit} (CAMSERVE_MAX_MASKED_FORWARDS): send fewer "
                "images, choose a layer with fewer channels, or use a gradient method"
            )

    def _check_render_budget(
        self,
        served: ServedModel,
        images: list[tuple[int, int]],
        classes: list[int] | None,
        options: RenderOptions,
    ) -> None:
        """413 when the pictures of images of these (height, width) would exceed CAMSERVE_MAX_RENDER_PIXELS."""
        per_pixel = (len(classes) if classes else 1) * (4 if options.overlay else 1)
        size = render.parse_picture_size(options.size)
        sizes = [render.picture_size(size, image, served.input_size) for image in images]
        rendered = sum(height * width for height, width in sizes) * per_pixel
        if rendered > self.settings.max_render_pixels:
            raise PayloadTooLargeError(
                f"this request would render {rendered / 1e6:.1f} megapixels of heatmaps"
                f"{' and overlays' if options.overlay else ''}, above the limit of "
                f"{self.settings.max_render_pixels / 1e6:.1f}; send smaller images, fewer targets or no overlay"
            )

    def _check_top_k(self, top_k: int, served: ServedModel) -> int:
        if top_k < 1:
            raise InvalidParameterError(f"top_k must be at least 1, got {top_k}")
        return min(top_k, served.num_classes)

    async def _decode(self, images: Sequence[ImagePayload], served: ServedModel, keep_pixels: bool) -> list[Decoded]:

        gpu_decode = served.device.type == "cuda" and not keep_pixels  # overlays need the pixels on the CPU

        def decode_one(payload: ImagePayload) -> Decoded:
            jpeg = jpeg_for_gpu(payload.data, self.limits) if gpu_decode else None
            if jpeg is not None and jpeg.width * jpeg.height <= GPU_DECODE_MAX_PIXELS:
                return Decoded(jpeg.width, jpeg.height, jpeg)  # decoded in the batch, on the torch thread
            image = decode_image(payload.data, self.limits)
            kept = image.pixels if keep_pixels else None
            if image.width * image.height <= RESIZE_WHILE_DECODING_ABOVE:  # resized in the batch
                return Decoded(image.width, image.height, image.pixels, kept)
            resized = resize_for_model(image.pixels, served.input_size, served.interpolation)
            return Decoded(image.width, image.height, resized, kept)

        def decode_all() -> list[Decoded]:
            return [decode_one(p) for p in images]

        return await asyncio.to_thread(decode_all)

    async def _run(
        self,
        served: ServedModel,
        decoded: list[Decoded],
        options: ExplainOptions | None,
        classes: list[int] | None,
        is_disconnected: DisconnectCheck | None,
    ) -> list[ItemOutput]:
        worker = self.workers.get(served.name)
        if worker is None:
            raise NotReadyError("the service is not ready")
        loop = asyncio.get_running_loop()
        items = [
            WorkItem(pixels=d.model_input, options=options, targets=classes, future=loop.create_future())
            for d in decoded
        ]
        worker.submit(items)
        gathered = asyncio.gather(*(item.future for item in items))
        deadline = time.monotonic() + self.settings.request_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _abandon(gathered)
                raise RequestTimeoutError(
                    f"the request did not finish within {self.settings.request_timeout_s:g} s; "
                    "try fewer or smaller images, or retry later"
                )
            done, _ = await asyncio.wait({gathered}, timeout=min(remaining, 0.25))
            if done:
                return list(gathered.result())
            if is_disconnected is not None and await is_disconnected():
                _abandon(gathered)
                raise ClientDisconnectedError("client disconnected")

    def _top_k(self, served: ServedModel, probabilities: Tensor, k: int) -> list[Prediction]:
        """The k most probable classes, in numpy: this runs off the torch thread, where torch ops must not."""
        values = probabilities.numpy()
        indices = np.argsort(-values, kind="stable")[:k]
        return [Prediction(index=int(i), label=served.labels[int(i)], score=float(values[i])) for i in indices]

    def _encode_all(
        self,
        served: ServedModel,
        images: list[Decoded],
        outputs: list[ItemOutput],
        top_k: int,
        options: RenderOptions,
        steps: int | None = None,
    ) -> list[ImageResult]:
        """Render and encode the explanations (numpy and PIL only: no torch work off its thread); `steps`: those
        of the faithfulness scores, when asked."""
        return [
            ImageResult(
                width=image.width,
                height=image.height,
                probabilities=output.probabilities.numpy(),
                predictions=self._top_k(served, output.probabilities, top_k),
                explanations=self._encode(served, image, output, options, steps),
                picture_size=self._resized(served, image, output, options),
            )
            for image, output in zip(images, outputs, strict=True)
        ]

    def _encode(
        self, served: ServedModel, image: Decoded, output: ItemOutput, options: RenderOptions, steps: int | None
    ) -> list[ClassMap]:
        if output.maps is None:
            return []
        level = self.settings.png_compress_level
        encode = _b64 if options.encoding == "base64" else _same
        size = self._picture_size(served, image, options)
        pixels = image.pixels.permute(1, 2, 0).numpy() if image.pixels is not None else None
        if pixels is not None:
            pixels = render.resize_pixels(pixels, size)
        fmt = options.overlay_format
        explanations = []
        for row, index in enumerate(output.classes):
            cam = output.maps[row].numpy()
            heatmap = overlay = media_type = None
            if options.heatmap or pixels is not None:
                picture = render.heatmap_image(cam, size)  # the raw map resized straight to the picture size
                if options.heatmap:
                    heatmap = encode(render.encode_png(picture, level))
                if pixels is not None:
                    blended = render.overlay_image(pixels, picture, options.colormap, options.alpha)
                    overlay = encode(render.encode_picture(blended, fmt, level))
                    media_type = render.OVERLAY_FORMATS[fmt]
            label, score = served.labels[index], float(output.probabilities[index])
            faithful = self._scores(output, row, steps)
            explanations.append(ClassMap(index, label, score, cam, heatmap, overlay, media_type, faithful))
        return explanations

    @staticmethod
    def _scores(output: ItemOutput, row: int, steps: int | None) -> FaithfulnessScores | None:
        if output.faithfulness is None or steps is None:
            return None
        drop, increase, deletion, insertion = output.faithfulness[row].tolist()
        return FaithfulnessScores(drop, increase, deletion, insertion, steps)

    def _resized(
        self, served: ServedModel, image: Decoded, output: ItemOutput, options: RenderOptions
    ) -> tuple[int, int] | None:
        if output.maps is None or options.size == "original":
            return None
        return self._picture_size(served, image, options)

    @staticmethod
    def _picture_size(served: ServedModel, image: Decoded, options: RenderOptions) -> tuple[int, int]:
        size = render.parse_picture_size(options.size)
        return render.picture_size(size, (image.height, image.width), served.input_size)


def _abandon(gathered: asyncio.Future) -> None:
    """Cancel the request's items (the worker skips them) and retrieve the outcome so asyncio logs nothing."""
    gathered.cancel()
    gathered.add_done_callback(lambda f: f.cancelled() or f.exception())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _same(data: bytes) -> bytes:
    return data
