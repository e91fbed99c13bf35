"""The domain service behind every protocol's routes: plan -> decode -> queue -> results.

`InferenceService.infer` takes one typed `InferenceRequest` (whatever protocol it came in by), checks it once into a
`Plan` (`camserve.plan`); decodes images (and resizes large ones for the model) on worker threads, except that on a
CUDA model JPEGs up to `GPU_DECODE_MAX_PIXELS` stay encoded for the batch to decode with nvJPEG on the torch thread
(never beside its kernels on another thread); sends one work item per image to the model's batching queue; waits
(bounded by the request timeout, abandoning work when the client goes away); and builds the results, pictures
encoded, on worker threads again (`camserve.results`). The torch thread runs only the batch itself. Knows nothing of
HTTP or of any protocol's response shape; nothing of gradients.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch

from camserve.batches import FatalObserver, ItemOutput, ModelBatches, WorkItem
from camserve.batching import BatchObserver, BatchQueue, TorchThread
from camserve.errors import NotReadyError, OverloadedError, RequestTimeoutError
from camserve.images import (
    ImageLimits,
    decode_image,
    eight_bit,
    jpeg_for_gpu,
    resize_float_for_model,
    resize_for_model,
)
from camserve.models import ModelRegistry, ServedModel
from camserve.plan import ImagePayload, InferenceRequest, Plan, make_plan
from camserve.results import Decoded, InferenceResult, image_result, inference_result
from camserve.settings import Settings

DisconnectCheck = Callable[[], Awaitable[bool]]
# Images above this many pixels are resized for the model on the decoding thread (PIL); smaller ones on the
# torch thread as part of the batch. Measured on 2 vCPUs: torch's antialiased resize takes 2 ms for a
# 0.3-megapixel photo, PIL's 3-4.5 ms; at 2 MP torch takes 28 ms, PIL 13 ms; at 12 MP 282 vs 199 ms.
RESIZE_WHILE_DECODING_ABOVE = 1_000_000
# On a CUDA model, JPEGs up to this many pixels stay encoded until the batch decodes them on the GPU (and resizes
# them at once); larger ones are decoded and resized here on the CPU, so the device never holds a 40 MP image.
GPU_DECODE_MAX_PIXELS = 12_000_000


#: A request's images are decoded, and their pictures rendered, in up to this many threads at once (2 vCPUs, 8 photos
#: per request explained: 1.12x images/s against one thread); images are decoded that way only when every header
#: says at most `PARALLEL_DECODE_MAX_PIXELS`, so a request of large photos holds one full-size picture at a time.
IMAGE_THREADS = min(4, os.cpu_count() or 1)
PARALLEL_DECODE_MAX_PIXELS = 4_000_000

T = TypeVar("T")
R = TypeVar("R")


async def in_threads(function: Callable[[T], R], items: list[T], threads: int | None = None) -> list[R]:
    """`function` over `items`, in order, in up to `threads` (default `IMAGE_THREADS`) threads, each taking a
    contiguous run of items; a failure is the first item's in order to fail, as if they ran one after another,
    and items after a failed one are not started."""
    size = -(-len(items) // (threads or IMAGE_THREADS)) or 1
    runs = [range(start, min(start + size, len(items))) for start in range(0, len(items), size)]
    first_failed = [len(items)]
    lock = threading.Lock()

    def run_all(indices: range) -> list[R]:
        results = []
        for index in indices:
            if index > first_failed[0]:
                break  # an earlier item failed: its error is the answer
            try:
                results.append(function(items[index]))
            except BaseException:
                with lock:
                    first_failed[0] = min(first_failed[0], index)
                raise
        return results

    done = await asyncio.gather(*(asyncio.to_thread(run_all, run) for run in runs), return_exceptions=True)
    for outcome in done:
        if isinstance(outcome, BaseException):
            raise outcome
    return [result for run in done for result in run]  # type: ignore[union-attr]  # no exceptions left


class ClientDisconnectedError(Exception):
    """The client went away before its answer was ready; its queued work was dropped."""


class InferenceService:
    """Owns one batching queue per served model, all computing on one `TorchThread`."""

    def __init__(
        self,
        registry: ModelRegistry,
        settings: Settings,
        thread: TorchThread | None = None,
        on_batch: BatchObserver | None = None,
        on_fatal: FatalObserver | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.thread = thread or TorchThread()
        self.limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        self.limits.apply_to_pil()
        self.queues: dict[str, BatchQueue[WorkItem, ItemOutput]] = {}
        #: Requests decoding or rendering right now (changed on the event loop only).
        self.in_host_stages = 0
        for model in registry:
            batches = ModelBatches(
                model, max_batch_size=settings.max_batch_size, on_fatal=on_fatal, host_busy=self.host_busy
            )
            self.queues[model.name] = BatchQueue(
                model.name,
                lambda items, staged, deliver, batches=batches: batches.run(items, staged, deliver),
                self.thread,
                max_batch_size=settings.max_batch_size,
                max_queue=settings.max_queue,
                max_wait_ms=settings.max_wait_ms,
                max_heavy_work=settings.max_heavy_forwards,
                stage=batches.stage,
                overlap=model.device.type == "cuda",
                on_batch=on_batch,
            )

    def start(self) -> None:
        for queue in self.queues.values():
            queue.start()

    async def close(self) -> None:
        await asyncio.gather(*(q.close() for q in self.queues.values()))

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self.registry)

    def model(self, name: str | None) -> ServedModel:
        """A served model by name (None: the default); an unknown name is UnknownModelError."""
        return self.registry.get(name)

    def queue_depths(self) -> dict[str, int]:
        return {name: q.depth for name, q in self.queues.items()}

    def images_in_flight(self) -> dict[str, int]:
        """Per model, the images in the batch being computed now."""
        return {name: q.in_flight for name, q in self.queues.items()}

    def pending_forwards(self) -> dict[str, int]:
        """Per model, the forward-equivalents of everything queued or computing."""
        return {name: q.pending_work for name, q in self.queues.items()}

    def plan(self, request: InferenceRequest) -> Plan:
        return make_plan(request, self.registry, self.settings)

    # -- the one inference path ------------------------------------------------------------
    async def infer(self, request: InferenceRequest, is_disconnected: DisconnectCheck | None = None) -> InferenceResult:
        """Plan, decode, run through the model's batching queue, build the results: what every protocol calls."""
        plan = self.plan(request)
        keep_pixels = plan.explain is not None and plan.pictures.overlay
        with self._host_stage():
            decoded = await self._decode(request.images, plan.served, keep_pixels, plan.sizes)
        outputs = await self._run(plan, decoded, is_disconnected)
        level = self.settings.png_compress_level
        pairs = list(zip(decoded, outputs, strict=True))
        with self._host_stage():
            results = await in_threads(lambda pair: image_result(plan, pair[0], pair[1], level), pairs)
        return inference_result(plan, results, outputs)

    def host_busy(self) -> bool:
        """Whether some request is decoding or rendering: its threads then want the cores too."""
        return self.in_host_stages > 0

    @contextmanager
    def _host_stage(self) -> Iterator[None]:
        self.in_host_stages += 1
        try:
            yield
        finally:
            self.in_host_stages -= 1

    async def _decode(
        self,
        images: Sequence[ImagePayload],
        served: ServedModel,
        keep_pixels: bool,
        sizes: Sequence[tuple[int, int] | None] | None = None,
    ) -> list[Decoded]:
        """Each image decoded in the channels the model takes; float pictures (16-bit, DICOM on a one-channel model)
        are always resized here, in float; overlays keep the 8-bit picture. `sizes`: the images' header sizes
        (`Plan.sizes`); without them, images are decoded one at a time."""
        # overlays need the pixels on the CPU; nvJPEG gives RGB only
        gpu_decode = served.device.type == "cuda" and not keep_pixels and served.channels == 3

        def decode_one(payload: ImagePayload) -> Decoded:
            jpeg = jpeg_for_gpu(payload.data, self.limits) if gpu_decode else None
            if jpeg is not None and jpeg.width * jpeg.height <= GPU_DECODE_MAX_PIXELS:
                return Decoded(jpeg.width, jpeg.height, jpeg)  # decoded in the batch, on the torch thread
            image = decode_image(payload.data, self.limits, served.channels)
            kept = eight_bit(image.pixels) if keep_pixels else None
            precise = image.pixels.dtype == torch.float32
            if not precise and image.width * image.height <= RESIZE_WHILE_DECODING_ABOVE:  # resized in the batch
                return Decoded(image.width, image.height, image.pixels, kept)
            resize = resize_float_for_model if precise else resize_for_model
            return Decoded(
                image.width, image.height, resize(image.pixels, served.input_size, served.interpolation), kept
            )

        small = sizes is not None and all(s is not None and s[0] * s[1] <= PARALLEL_DECODE_MAX_PIXELS for s in sizes)
        return await in_threads(decode_one, list(images), None if small else 1)

    async def _run(
        self, plan: Plan, decoded: list[Decoded], is_disconnected: DisconnectCheck | None
    ) -> list[ItemOutput]:
        queue = self.queues.get(plan.served.name)
        if queue is None:
            raise NotReadyError("the service is not ready")
        items = [WorkItem(d.model_input, plan.explain, plan.classes) for d in decoded]  # type: ignore[arg-type]
        costs = [plan.cost] * len(items)
        if plan.heavy:
            self._check_wait(queue.estimate_s(sum(costs)))
        gathered = asyncio.gather(*queue.submit(items, costs=costs, heavy=plan.heavy, priority=plan.priority))
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

    def _check_wait(self, estimate_s: float | None) -> None:
        """503 at once for heavy work that would not finish within the request timeout at the measured rate."""
        limit = self.settings.request_timeout_s
        if estimate_s is not None and estimate_s > limit:
            raise OverloadedError(
                f"this request would finish in about {estimate_s:.0f} s with the heavy work queued before it, past "
                f"the request timeout of {limit:g} s; retry later, send fewer images, or use a gradient method",
                retry_after_s=max(1, round(estimate_s - limit)),
            )


def _abandon(gathered: asyncio.Future) -> None:
    """Cancel the request's items (the queue skips them) and retrieve the outcome so asyncio logs nothing."""
    gathered.cancel()
    gathered.add_done_callback(lambda f: f.cancelled() or f.exception())
