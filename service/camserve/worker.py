"""The batching worker queue: one per served model.

Each image of a request is one `WorkItem`. Items wait in a bounded queue; the worker takes everything
waiting (up to `max_batch_size`) and runs it through the CAM engine on its own thread, so many
clients share one forward pass. Predict items ride along in an explain batch's forward pass, one whose method runs no
extra forwards (never behind a long Score-CAM).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from camserve.cam import faithfulness
from camserve.cam.engine import Explanation
from camserve.cam.methods import get_method
from camserve.device_faults import as_service_error
from camserve.errors import DeviceFailedError, NotReadyError, OverloadedError
from camserve.images import (
    EncodedJpeg,
    ImageLimits,
    decode_image,
    decode_jpeg_batch_cuda,
    preprocess,
    resize_to_model,
    stage_pinned,
)
from camserve.models import ServedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExplainOptions:
    """What to explain; items with equal options share one engine call. `faithfulness_steps`: score every
    explanation's faithfulness with that many deletion/insertion steps (None: not asked)."""

    method: str
    layers: tuple[str, ...] | None
    counterfactual: bool
    faithfulness_steps: int | None = None


@dataclass
class WorkItem:
    """One image waiting for the worker. `options` None means predict only.

    `pixels` is what `preprocess` takes: float32 [3, h, w] at the model's input size from
    `resize_for_model` (resized where it was decoded), or a uint8 [3, H, W] CPU image resized here; or an
    `EncodedJpeg` that the batch decodes on the GPU, on the torch thread, and resizes at once.
    """

    pixels: Tensor | EncodedJpeg
    options: ExplainOptions | None
    targets: list[int] | None
    future: asyncio.Future[ItemOutput]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class ItemOutput:
    """Per image: class probabilities and, for explain items, one raw map per explained class.

    `maps` is float32 [T, h, w] at the engine's resolution, on the CPU; pictures are rendered from it
    off this thread. `faithfulness` is float32 [T, 4] (drop, increase, deletion AUC, insertion AUC) when asked.
    """

    probabilities: Tensor
    layers: tuple[str, ...] = ()
    method: str | None = None
    classes: list[int] = field(default_factory=list)
    maps: Tensor | None = None
    faithfulness: Tensor | None = None


BatchObserver = Callable[[str, int, float], None]
FatalObserver = Callable[[BaseException], None]

# Pixels one nvJPEG call decodes at most (24 MP: 72 MB of uint8 at once, plus one image's float copy while it
# is resized); a batch's JPEGs are decoded in as few calls as fit.
GPU_DECODE_BUDGET_PIXELS = 24_000_000

_TORCH_THREAD: ThreadPoolExecutor | None = None


def torch_executor() -> ThreadPoolExecutor:
    """The one thread that runs every parallel torch operation of the process (loading, compute).

    On CPU, once a second thread has run parallel torch operations, every OpenMP-parallel op in the
    process gets about 2.5x slower (measured: EfficientNet-Lite0 forward 19 ms on one thread, 50 ms
    after a second thread ran one). Keeping all torch work on one thread avoids that; on a GPU one
    thread also keeps kernel launches ordered.
    """
    global _TORCH_THREAD
    if _TORCH_THREAD is None:
        _TORCH_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="camserve-torch")
    return _TORCH_THREAD


class BatchWorker:
    """Bounded queue + one compute thread for one model."""

    def __init__(
        self,
        model: ServedModel,
        *,
        max_batch_size: int,
        max_queue: int,
        max_wait_ms: float = 0.0,
        on_batch: BatchObserver | None = None,
        on_fatal: FatalObserver | None = None,
        overlap: bool | None = None,
    ) -> None:
        """`overlap` (default: on CUDA models): under a backlog, batch n+1 is taken while batch n computes and
        its images are staged in pinned memory on another thread, so its upload does not wait for them."""
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_wait_s = max_wait_ms / 1000.0
        self._on_batch = on_batch
        self._on_fatal = on_fatal
        self._pending: deque[WorkItem] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = torch_executor()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._computing = 0
        self._staged_items = 0
        self._overlap = model.device.type == "cuda" if overlap is None else overlap

    @property
    def in_flight(self) -> int:
        """Items in the batch being computed now, and in the next one while it is staged."""
        return self._computing + self._staged_items

    @property
    def depth(self) -> int:
        """Items waiting (not yet computing)."""
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"worker-{self.model.name}")

    def submit(self, items: list[WorkItem]) -> None:
        """Enqueue all items of one request, or none of them when the queue is full."""
        if self._closing:
            raise NotReadyError("the service is shutting down; retry on another instance")
        if len(self._pending) + len(items) > self.max_queue:
            raise OverloadedError(
                f"model {self.model.name!r} is overloaded: {len(self._pending)} images are queued "
                f"(limit {self.max_queue}); retry shortly",
                retry_after_s=1,
            )
        self._pending.extend(items)
        self._idle.clear()
        self._wakeup.set()

    async def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new items, finish what is queued, stop the thread."""
        self._closing = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        except TimeoutError:
            log.warning("worker %s: %d items unfinished at shutdown", self.model.name, len(self._pending))
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        ahead: tuple[list[WorkItem], asyncio.Future[list[Tensor | None]]] | None = None
        while True:
            if ahead is not None:
                (batch, staging), ahead = ahead, None
                try:
                    staged = await staging
                except Exception:  # staging is an optimisation: the batch then uploads as it is
                    log.exception("worker %s: staging a batch in pinned memory failed", self.model.name)
                    staged = None
                self._staged_items = 0
            else:
                if not self._pending:
                    self._idle.set()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if self.max_wait_s and len(self._pending) < self.max_batch_size:
                    await self._hold_for_more()
                batch, staged = self._take_batch(), None
            if not batch:
                continue
            started = time.perf_counter()
            self._computing = len(batch)
            computing = loop.run_in_executor(self._executor, self.compute, batch, staged)
            if self._overlap and len(self._pending) >= self.max_batch_size:  # a full next batch waits anyway
                following = self._take_batch()
                self._staged_items = len(following)
                ahead = (following, loop.run_in_executor(None, self.stage, following))
            try:
                outputs = await computing
            except Exception as exc:  # a failure of the whole batch reaches every caller
                log.exception("worker %s: batch of %d failed", self.model.name, len(batch))
                outputs = [as_service_error(exc)] * len(batch)
            finally:
                self._computing = 0
            if self._on_batch is not None:
                self._on_batch(self.model.name, len(batch), time.perf_counter() - started)
            failed = next((o for o in outputs if isinstance(o, DeviceFailedError)), None)
            if failed is not None and self._on_fatal is not None:
                self._on_fatal(failed)
            for item, output in zip(batch, outputs, strict=True):
                if item.future.done():
                    continue
                if isinstance(output, BaseException):
                    item.future.set_exception(output)
                else:
                    item.future.set_result(output)

    async def _hold_for_more(self) -> None:
        deadline = self._pending[0].enqueued + self.max_wait_s
        while len(self._pending) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[WorkItem]:
        """Up to max_batch_size live items; items whose caller gave up are dropped here."""
        batch: list[WorkItem] = []
        while self._pending and len(batch) < self.max_batch_size:
            item = self._pending.popleft()
            if not item.future.done():
                batch.append(item)
        return batch

    # -- compute thread --------------------------------------------------------------------
    def stage(self, batch: list[WorkItem]) -> list[Tensor | None]:
        """The host half of a batch's upload, run off the torch thread: its CPU images in pinned memory."""
        return stage_pinned([item.pixels if isinstance(item.pixels, Tensor) else None for item in batch])

    def compute(
        self, batch: list[WorkItem], staged: list[Tensor | None] | None = None
    ) -> list[ItemOutput | BaseException]:
        """Run a batch: decode its JPEGs, then one engine call per distinct ExplainOptions; predict items join the
        first group whose method runs no extra forwards (else they run alone, first). `staged` holds inputs `stage`
        prepared ahead (None where there is none). Device out-of-memory and sticky device errors come back as
        `as_service_error` words them."""
        outputs: list[ItemOutput | BaseException] = [RuntimeError("not computed")] * len(batch)
        inputs = self._decode_jpegs(batch, outputs)
        if staged is not None:
            inputs = [s if s is not None else x for s, x in zip(staged, inputs, strict=True)]
        groups: dict[ExplainOptions | None, list[int]] = {}
        for index, item in enumerate(batch):
            if inputs[index] is not None:
                groups.setdefault(item.options, []).append(index)
        predict_only = groups.pop(None, [])
        host = next((o for o in groups if o is not None and get_method(o.method).family != "perturbation"), None)
        if predict_only and host is None:  # alone, and first: not behind a long Score-CAM
            try:
                x = self._inputs(inputs, predict_only)
                probabilities = torch.softmax(self.model.engine.predict(x), dim=1).cpu()
                for row, i in enumerate(predict_only):
                    outputs[i] = ItemOutput(probabilities=probabilities[row])
            except Exception as exc:
                for i in predict_only:
                    outputs[i] = as_service_error(exc)
        for options, indices in groups.items():
            members = indices + (predict_only if options == host else [])
            try:
                self._explain_group(batch, inputs, members, options, outputs)
            except Exception as exc:
                for i in members:
                    outputs[i] = as_service_error(exc)
        return outputs

    def _decode_jpegs(self, batch: list[WorkItem], outputs: list[ItemOutput | BaseException]) -> list[Tensor | None]:
        """Each item's model input. The batch's `EncodedJpeg`s are decoded here, on the torch thread, in one
        nvJPEG call per `GPU_DECODE_BUDGET_PIXELS` (stream-ordered after the previous batch's kernels), and each
        is resized at once; when nvJPEG declines, on the CPU. A JPEG that cannot be decoded fails alone
        (None, its error in `outputs`)."""
        inputs: list[Tensor | None] = [None if isinstance(item.pixels, EncodedJpeg) else item.pixels for item in batch]
        pending = [i for i, item in enumerate(batch) if isinstance(item.pixels, EncodedJpeg)]
        model = self.model
        for chunk in _chunks(pending, [_jpeg(batch[i]).width * _jpeg(batch[i]).height for i in pending]):
            decoded = decode_jpeg_batch_cuda([_jpeg(batch[i]).data for i in chunk], model.device)
            for n, i in enumerate(chunk):
                jpeg = _jpeg(batch[i])
                try:
                    if decoded is not None:
                        inputs[i] = resize_to_model(decoded[n], model.input_size, model.interpolation)
                    else:
                        limits = ImageLimits(max_bytes=len(jpeg.data), max_pixels=jpeg.width * jpeg.height)
                        inputs[i] = decode_image(jpeg.data, limits).pixels
                except Exception as exc:
                    outputs[i] = as_service_error(exc)
            del decoded
        return inputs

    def _inputs(self, inputs: list[Tensor | None], indices: list[int]) -> Tensor:
        model = self.model
        pixels = [inputs[i] for i in indices]
        return preprocess(
            pixels,  # type: ignore[arg-type]  # only items that have an input are grouped
            model.input_size,
            model.mean,
            model.std,
            device=model.device,
            interpolation=model.interpolation,
        )

    def _explain_group(
        self,
        batch: list[WorkItem],
        inputs: list[Tensor | None],
        members: list[int],
        options: ExplainOptions,
        outputs: list[ItemOutput | BaseException],
    ) -> None:
        """One engine call; its probabilities, maps and (for top-1 targets) classes come to the host once each,
        and are split per image on the host by the rows each image's targets give (the engine's order). With
        `faithfulness_steps`, every map is scored too: its extra forwards run here, `max_batch_size` images each."""
        x = self._inputs(inputs, members)
        targets = [batch[i].targets if batch[i].options is not None else [] for i in members]
        result = self.model.engine.explain(
            x, targets, method=options.method, layers=options.layers, counterfactual=options.counterfactual
        )
        counts = [1 if t is None else len(t) for t in targets]
        probabilities = torch.softmax(result.logits, dim=1)
        scores = None
        if options.faithfulness_steps is not None and result.pairs:
            scores = self._faithfulness(x, result, probabilities, options.faithfulness_steps)
        probabilities = probabilities.cpu()
        maps = result.maps.float().cpu()
        if maps.shape[0] != sum(counts):
            raise RuntimeError(f"the engine gave {maps.shape[0]} maps for {sum(counts)} (image, class) pairs")
        classes = [c for _, c in result.pairs]  # host lists from the engine: no device copy
        start = 0
        for row, (i, count) in enumerate(zip(members, counts, strict=True)):
            if batch[i].options is None:
                outputs[i] = ItemOutput(probabilities=probabilities[row])
                continue
            rows = slice(start, start + count)
            start += count
            outputs[i] = ItemOutput(
                probabilities=probabilities[row],
                layers=result.layers,
                method=result.method,
                classes=classes[rows],
                maps=maps[rows] if count else None,
                faithfulness=scores[rows] if scores is not None and count else None,
            )

    def _faithfulness(self, x: Tensor, result: Explanation, probabilities: Tensor, steps: int) -> Tensor:
        """float32 [N, 4] on the host: each map's drop, increase, deletion and insertion AUC (service.cam.faithfulness);
        Y is the class probability of the explanation's own forward, the rest are plain (compiled when the fast path
        is on) forwards of at most `max_batch_size` images."""
        return (
            faithfulness.evaluate(
                self.model.engine.predict,
                x,
                result.maps,
                [i for i, _ in result.pairs],
                [c for _, c in result.pairs],
                probabilities[result.image_index, result.class_index],
                mean=self.model.mean,
                std=self.model.std,
                steps=steps,
                chunk=self.max_batch_size,
            )
            .table()
            .cpu()
        )


def _jpeg(item: WorkItem) -> EncodedJpeg:
    assert isinstance(item.pixels, EncodedJpeg)
    return item.pixels


def _chunks(indices: list[int], pixels: list[int], budget: int | None = None) -> list[list[int]]:
    """`indices` in order, grouped so that each group's `pixels` sum stays within `budget` (an image larger
    than the budget goes alone)."""
    budget = GPU_DECODE_BUDGET_PIXELS if budget is None else budget
    chunks: list[list[int]] = []
    total = 0
    for index, size in zip(indices, pixels, strict=True):
        if not chunks or total + size > budget:
            chunks.append([])
            total = 0
        chunks[-1].append(index)
        total += size
    return chunks
