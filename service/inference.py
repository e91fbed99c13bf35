"""The domain service behind the HTTP routes: decode -> queue -> render.

Validates parameters; decodes images (and resizes large ones for the model) on worker threads; sends one work
item per image to the model's worker queue; waits (bounded by the request timeout, abandoning work when
the client goes away); renders heatmaps and overlays, PNG-encodes them and builds plain response dicts on
worker threads again. The torch thread runs only the batch itself. Knows nothing of HTTP; nothing of gradients.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from service.cam import render
from service.cam.methods import get_method
from service.errors import InvalidParameterError, NotReadyError, PayloadTooLargeError, RequestTimeoutError
from service.images import ImageLimits, check_media_type, decode_image, resize_for_model
from service.models import ModelRegistry, ServedModel
from service.settings import Settings
from service.worker import BatchObserver, BatchWorker, ExplainOptions, ItemOutput, WorkItem

DisconnectCheck = Callable[[], Awaitable[bool]]
MAX_TARGETS = 20  # classes explained per image: each costs a backward round and a PNG per image
MAX_LAYERS = 8
# Images above this many pixels are resized for the model on the decoding thread (PIL); smaller ones on the
# torch thread as part of the batch. Measured on 2 vCPUs: torch's antialiased resize takes 2 ms for a
# 0.3-megapixel photo, PIL's 3-4.5 ms; at 2 MP torch takes 28 ms, PIL 13 ms; at 12 MP 282 vs 199 ms.
RESIZE_WHILE_DECODING_ABOVE = 1_000_000


class ClientDisconnectedError(Exception):
    """The client went away before its answer was ready; its queued work was dropped."""


@dataclass(frozen=True)
class RenderOptions:
    """How explained maps turn into pictures."""

    overlay: bool = False
    colormap: str = "jet"
    alpha: float = 0.5
    raw: bool = False


@dataclass(frozen=True)
class Decoded:
    """One decoded image: its size, the input the model takes from it (`WorkItem.pixels`), and its full
    pixels only while an overlay still needs them (a 12 MP photo is 36 MB)."""

    width: int
    height: int
    model_input: Tensor
    pixels: Tensor | None = None


@dataclass(frozen=True)
class ImagePayload:
    """Raw bytes of one image as received, with the media type the client declared (if any)."""

    data: bytes
    content_type: str | None = None


class InferenceService:
    """Owns one BatchWorker per served model."""

    def __init__(self, registry: ModelRegistry, settings: Settings, on_batch: BatchObserver | None = None) -> None:
        self.registry = registry
        self.settings = settings
        self.limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        self.workers = {
            m.name: BatchWorker(
                m,
                max_batch_size=settings.max_batch_size,
                max_queue=settings.max_queue,
                max_wait_ms=settings.max_wait_ms,
                on_batch=on_batch,
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

    # -- endpoints ------------------------------------------------------------------------
    async def predict(
        self,
        images: Sequence[ImagePayload],
        *,
        model: str | None = None,
        top_k: int = 5,
        is_disconnected: DisconnectCheck | None = None,
    ) -> dict:
        served = self.registry.get(model)
        top_k = self._check_top_k(top_k, served)
        decoded = await self._decode(images, served, keep_pixels=False)
        outputs = await self._run(served, decoded, None, None, is_disconnected)
        results = [
            {"width": d.width, "height": d.height, "predictions": self._top_k(served, o.probabilities, top_k)}
            for d, o in zip(decoded, outputs, strict=True)
        ]
        return {"model": served.name, "results": results}

    async def explain(
        self,
        images: Sequence[ImagePayload],
        *,
        model: str | None = None,
        method: str = "gradcampp",
        targets: Sequence[int | str] | None = None,
        layers: Sequence[str] | None = None,
        counterfactual: bool = False,
        top_k: int = 5,
        options: RenderOptions = RenderOptions(),
        is_disconnected: DisconnectCheck | None = None,
    ) -> dict:
        served = self.registry.get(model)
        if not served.explainable:
            raise InvalidParameterError(
                f"model {served.name!r} is a TorchScript model: it can predict but not explain (CAMs need module "
                "hooks); serve it as a torchvision or entry-point model to explain it"
            )
        top_k = self._check_top_k(top_k, served)
        cam = get_method(method)
        render.check_colormap(options.colormap)
        if not 0.0 <= options.alpha <= 1.0:
            raise InvalidParameterError(f"alpha must be between 0 and 1, got {options.alpha}")
        if targets and len(targets) > MAX_TARGETS:
            raise InvalidParameterError(f"{len(targets)} targets requested; at most {MAX_TARGETS} per request")
        if layers and len(layers) > MAX_LAYERS:
            raise InvalidParameterError(f"{len(layers)} layers requested; at most {MAX_LAYERS} per request")
        resolved_layers = served.engine.resolve_layers(list(layers), None) if layers else None
        classes = [served.class_index(t) for t in targets] if targets else None
        explain_options = ExplainOptions(method=cam.name, layers=resolved_layers, counterfactual=counterfactual)
        decoded = await self._decode(images, served, keep_pixels=options.overlay)
        per_pixel = (len(classes) if classes else 1) * (4 if options.overlay else 1)
        rendered = sum(d.width * d.height for d in decoded) * per_pixel
        if rendered > self.settings.max_render_pixels:
            raise PayloadTooLargeError(
                f"this request would render {rendered / 1e6:.1f} megapixels of heatmaps"
                f"{' and overlays' if options.overlay else ''}, above the limit of "
                f"{self.settings.max_render_pixels / 1e6:.1f}; send smaller images, fewer targets or no overlay"
            )
        outputs = await self._run(served, decoded, explain_options, classes, is_disconnected)
        results = await asyncio.to_thread(self._encode_all, served, decoded, outputs, top_k, options)
        return {
            "model": served.name,
            "method": cam.name,
            "layers": list(outputs[0].layers),
            "counterfactual": counterfactual,
            "results": results,
        }

    # -- steps ----------------------------------------------------------------------------
    def _check_top_k(self, top_k: int, served: ServedModel) -> int:
        if top_k < 1:
            raise InvalidParameterError(f"top_k must be at least 1, got {top_k}")
        return min(top_k, served.num_classes)

    async def _decode(self, images: Sequence[ImagePayload], served: ServedModel, keep_pixels: bool) -> list[Decoded]:
        if not images:
            raise InvalidParameterError("no image given: send at least one image")
        if len(images) > self.settings.max_images_per_request:
            raise PayloadTooLargeError(
                f"{len(images)} images in one request; the limit is {self.settings.max_images_per_request}"
            )
        for payload in images:
            check_media_type(payload.content_type)

        def decode_one(payload: ImagePayload) -> Decoded:
            image = decode_image(payload.data, self.limits, served.device)
            small = image.width * image.height <= RESIZE_WHILE_DECODING_ABOVE
            kept = image.pixels if keep_pixels else None
            if small or image.pixels.device.type != "cpu":  # resized on the torch thread (on the GPU if there)
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

    def _top_k(self, served: ServedModel, probabilities: Tensor, k: int) -> list[dict]:
        scores, indices = torch.topk(probabilities, k)
        return [
            {"index": int(i), "label": served.labels[int(i)], "score": float(s)}
            for s, i in zip(scores.tolist(), indices.tolist(), strict=True)
        ]

    def _encode_all(
        self,
        served: ServedModel,
        images: list[Decoded],
        outputs: list[ItemOutput],
        top_k: int,
        options: RenderOptions,
    ) -> list[dict]:
        """Render, PNG-encode and base64 the explanations (numpy and PIL only: no torch work off its thread)."""
        return [
            {
                "width": image.width,
                "height": image.height,
                "predictions": self._top_k(served, output.probabilities, top_k),
                "explanations": self._encode(served, image, output, options),
            }
            for image, output in zip(images, outputs, strict=True)
        ]

    def _encode(self, served: ServedModel, image: Decoded, output: ItemOutput, options: RenderOptions) -> list[dict]:
        if output.maps is None:
            return []
        level = self.settings.png_compress_level
        size = (image.height, image.width)
        pixels = image.pixels.cpu().permute(1, 2, 0).numpy() if image.pixels is not None else None
        explanations = []
        for row, index in enumerate(output.classes):
            heatmap = render.heatmap_image(output.maps[row].numpy(), size)
            entry: dict = {
                "index": index,
                "label": served.labels[index],
                "score": float(output.probabilities[index]),
                "heatmap": _b64(render.encode_png(heatmap, level)),
            }
            if pixels is not None:
                overlay = render.overlay_image(pixels, heatmap, options.colormap, options.alpha)
                entry["overlay"] = _b64(render.encode_png(overlay, level))
            if options.raw:
                entry["cam"] = output.maps[row].tolist()
            explanations.append(entry)
        return explanations


def _abandon(gathered: asyncio.Future) -> None:
    """Cancel the request's items (the worker skips them) and retrieve the outcome so asyncio logs nothing."""
    gathered.cancel()
    gathered.add_done_callback(lambda f: f.cancelled() or f.exception())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
