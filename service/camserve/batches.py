"""What one batch of a served model computes: the function the batching queue is given for that model.

A batch is a list of `WorkItem`s (one image each, with what to explain about it). `ModelBatches.run` decodes the
batch's GPU JPEGs, groups items by `ExplainPlan` into one engine call each, lets predict items ride along in a group
whose method runs no extra forwards (never behind a long Score-CAM), and scores faithfulness when asked. It runs on
the torch thread; failures come back per item, worded by `as_service_error`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from torch import Tensor

from camserve.cam import faithfulness
from camserve.cam.engine import Explanation
from camserve.cam.family import Method
from camserve.cam.heads import probabilities as probabilities_of
from camserve.cam.methods import get_method
from camserve.cam.rise import RISE
from camserve.cam.runtime import intra_op_threads
from camserve.device_faults import as_service_error
from camserve.errors import DeviceFailedError
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

# Pixels one nvJPEG call decodes at most (24 MP: 72 MB of uint8 at once, plus one image's float copy while it
# is resized); a batch's JPEGs are decoded in as few calls as fit.
GPU_DECODE_BUDGET_PIXELS = 24_000_000

FatalObserver = Callable[[BaseException], None]
Deliver = Callable[[int, object], None]


@dataclass(frozen=True)
class ExplainPlan:
    """What to explain, resolved against the model; items with equal plans share one engine call.
    `faithfulness_steps`: score every explanation's faithfulness with that many steps (None: not asked)."""

    method: str
    layers: tuple[str, ...] | None
    counterfactual: bool
    faithfulness_steps: int | None = None
    #: images without targets explain every class at or above this probability (sigmoid heads); None: top-1
    above: float | None = None
    #: with `above`: the most classes one image explains (what the render and faithfulness budgets hold)
    most: int = 1
    #: RISE's masks (None: its default)
    rise_masks: int | None = None

    def method_object(self) -> Method:
        """The method to run, with this plan's parameters."""
        method = get_method(self.method)
        return method.with_masks(self.rise_masks) if isinstance(method, RISE) and self.rise_masks else method


@dataclass(frozen=True)
class WorkItem:
    """One image to compute. `options` None means predict only.

    `pixels` is what `preprocess` takes, in the model's channels C: float32 [C, h, w] at the model's input size from
    `resize_for_model` or `resize_float_for_model` (resized where it was decoded), or a uint8 [C, H, W] CPU image
    resized here; or an `EncodedJpeg` that the batch decodes on the GPU, on the torch thread, and resizes at once.
    """

    pixels: Tensor | EncodedJpeg
    options: ExplainPlan | None
    targets: list[int] | None


@dataclass
class ItemOutput:
    """Per image: class probabilities and, for explain items, one raw map per explained class.

    `maps` is float32 [T, h, w] at the engine's resolution, on the CPU; pictures are rendered from it
    off this thread. `faithfulness` is float32 [T, 4] (drop, increase, deletion AUC, insertion AUC) when asked.
    """

    probabilities: Tensor
    layers: tuple[str, ...] = ()
    classes: list[int] = field(default_factory=list)
    maps: Tensor | None = None
    faithfulness: Tensor | None = None


class ModelBatches:
    """The batch function of one served model. `max_batch_size` also bounds faithfulness' extra forwards;
    `on_fatal` hears of a sticky device failure (the instance is then broken); `host_busy` says whether other
    requests are decoding or rendering (torch then leaves them the cores it can: `CamEngine.torch_threads`)."""

    def __init__(
        self,
        model: ServedModel,
        *,
        max_batch_size: int,
        on_fatal: FatalObserver | None = None,
        host_busy: Callable[[], bool] | None = None,
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self._on_fatal = on_fatal
        self._host_busy = host_busy

    def run(
        self, batch: list[WorkItem], staged: list[Tensor | None] | None = None, deliver: Deliver | None = None
    ) -> list[ItemOutput | BaseException]:
        """`compute`, with a failure of the whole batch given to every item and a device failure reported."""
        try:
            outputs = self.compute(batch, staged, deliver)
        except Exception as exc:
            log.exception("model %s: batch of %d failed", self.model.name, len(batch))
            outputs = [as_service_error(exc)] * len(batch)
        failed = next((o for o in outputs if isinstance(o, DeviceFailedError)), None)
        if failed is not None and self._on_fatal is not None:
            self._on_fatal(failed)
        return outputs

    def stage(self, batch: list[WorkItem]) -> list[Tensor | None]:
        """The host half of a batch's upload, run off the torch thread: its CPU images in pinned memory."""
        return stage_pinned([item.pixels if isinstance(item.pixels, Tensor) else None for item in batch])

    def compute(
        self, batch: list[WorkItem], staged: list[Tensor | None] | None = None, deliver: Deliver | None = None
    ) -> list[ItemOutput | BaseException]:
        """Run a batch: decode its JPEGs, then one engine call per distinct ExplainPlan, the cheapest first; predict
        items join the first group whose method runs no extra forwards (else they run alone, first). Each group's
        items are handed to `deliver(index, output)` as soon as the group is done. `staged` holds inputs `stage`
        prepared ahead (None where there is none). Device out-of-memory and sticky device errors come back as
        `as_service_error` words them."""
        deliver = deliver or _keep
        outputs: list[ItemOutput | BaseException] = [RuntimeError("not computed")] * len(batch)
        inputs = self._decode_jpegs(batch, outputs)
        if staged is not None:
            inputs = [s if s is not None else x for s, x in zip(staged, inputs, strict=True)]
        groups: dict[ExplainPlan | None, list[int]] = {}
        for index, item in enumerate(batch):
            if inputs[index] is not None:
                groups.setdefault(item.options, []).append(index)
        predict_only = groups.pop(None, [])
        host = next((o for o in groups if o is not None and get_method(o.method).family != "perturbation"), None)
        if predict_only and host is None:  # alone, and first: not behind a long Score-CAM
            try:
                with self._threads(None, None):
                    x = self._inputs(inputs, predict_only)
                    probabilities = probabilities_of(self.model.engine.predict(x), self.model.head).cpu()
                for row, i in enumerate(predict_only):
                    outputs[i] = ItemOutput(probabilities=probabilities[row])
            except Exception as exc:
                for i in predict_only:
                    outputs[i] = as_service_error(exc)
            for i in predict_only:
                deliver(i, outputs[i])
        for options in sorted(groups, key=_heaviness):
            members = groups[options] + (predict_only if options == host else [])
            try:
                with self._threads(options.layers, options.method):
                    self._explain_group(batch, inputs, members, options, outputs)
            except Exception as exc:
                for i in members:
                    outputs[i] = as_service_error(exc)
            for i in members:
                deliver(i, outputs[i])
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
                        inputs[i] = decode_image(jpeg.data, limits, model.channels).pixels
                except Exception as exc:
                    outputs[i] = as_service_error(exc)
            del decoded
        return inputs

    def _threads(self, layers: tuple[str, ...] | None, method: str | None) -> AbstractContextManager[None]:
        """torch's intra-op threads for a group explained by `method` at `layers` (None: predicted): fewer only
        while other requests' host work wants the cores (measured on 2 vCPUs: 1.10x images/s for 16 users
        explaining; alone, one thread made an explanation 3-4 % slower). Decided when the group starts."""
        engine = self.model.engine
        busy = self._host_busy is not None and self._host_busy()
        return intra_op_threads(engine.torch_threads(layers, method) if busy else engine.threads)

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
        options: ExplainPlan,
        outputs: list[ItemOutput | BaseException],
    ) -> None:
        """One engine call; its probabilities, maps and (for top-1 targets) classes come to the host once each,
        and are split per image on the host by the rows each image's targets give (the engine's order). With
        `faithfulness_steps`, every map is scored too: its extra forwards run here, `max_batch_size` images each."""
        x = self._inputs(inputs, members)
        targets = [batch[i].targets if batch[i].options is not None else [] for i in members]
        result = self.model.engine.explain(
            x,
            targets,
            method=options.method_object(),
            layers=options.layers,
            counterfactual=options.counterfactual,
            above=options.above,
            most=options.most,
        )
        counts = [0] * len(members)
        for image, _ in result.pairs:  # the engine's rows are image-major per round; count them per image
            counts[image] += 1
        probabilities = probabilities_of(result.logits, self.model.head)
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
                classes=classes[rows],
                maps=maps[rows] if count else None,
                faithfulness=scores[rows] if scores is not None and count else None,
            )

    def _faithfulness(self, x: Tensor, result: Explanation, probabilities: Tensor, steps: int) -> Tensor:
        """float32 [N, 4] on the host: each map's drop, increase, deletion and insertion AUC
        (camserve.cam.faithfulness); Y is the class probability of the explanation's own forward, the rest are plain
        forwards (through the model's runtime) of at most `max_batch_size` images."""
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
                head=self.model.head,
                chunk=self.max_batch_size,
            )
            .table()
            .cpu()
        )


def is_heavy(plan: ExplainPlan | None, extra_per_image: float = math.inf) -> bool:
    """Work that runs extra forwards in chunks, the queue's heavy lane: faithfulness scores, and perturbation
    methods whose extra work is above `CHEAP_EXTRA_FORWARDS` forward-equivalents per image (`extra_per_image`)."""
    if plan is None:
        return False
    perturbation, faithfulness = _heaviness(plan)
    return faithfulness or (perturbation and extra_per_image > CHEAP_EXTRA_FORWARDS)


#: Extra forward-equivalents per image up to which a perturbation method is cheap work (Ablation-CAM and ReciproCAM
#: at a layer near the head, whose reruns cost a small fraction of a forward each: tens of milliseconds in all).
CHEAP_EXTRA_FORWARDS = 16


def _heaviness(plan: ExplainPlan) -> tuple[bool, bool]:
    return get_method(plan.method).family == "perturbation", plan.faithfulness_steps is not None


def _keep(_index: int, _output: object) -> None:
    """No early delivery: the outputs come back with the batch."""


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
