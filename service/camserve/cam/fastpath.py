"""The compiled fast path: a model's split at one layer, with the prefix (and, for predictions, the suffix)
compiled by `torch.compile` for inference.

Explaining at that layer runs the compiled prefix without autograd, then the suffix eagerly with autograd
from the activation to the logits (torch.compile gives no gradient for activations inside a compiled
region, so the cut is at the target layer). Predicting runs both halves compiled. Everything a batch can
hit is compiled in `warm_up`: batch 1, and one graph with a dynamic batch dimension for 2..max; afterwards
a call that would need a new compilation runs eagerly instead (never waits for a compiler) and is logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor

from camserve.cam.split import ModelSplit

log = logging.getLogger(__name__)

#: Inductor options: weights are constants of an inference graph (folded, pre-packed for oneDNN on CPU).
COMPILE_OPTIONS = {"freezing": True}

Autocast = Callable[[], AbstractContextManager[object]]


@dataclass(frozen=True)
class WarmUpReport:
    """What warm-up found: compile seconds and the largest |compiled - eager| logit."""

    compile_s: float
    max_logit_error: float


class CompiledSplit:
    """The compiled halves of a `ModelSplit` (a `runtime.Backend`); call `warm_up` before serving."""

    name = "compiled"

    def __init__(self, split: ModelSplit, *, autocast: Autocast, channels_last: bool) -> None:
        self.split = split
        self.layer = split.layer
        self.channels_last = channels_last
        self._autocast = autocast
        self._prefix = torch.compile(split.prefix, options=COMPILE_OPTIONS)
        self._suffix = torch.compile(split.suffix, options=COMPILE_OPTIONS)
        self._warm = False
        #: The largest batch `warm_up` compiled for (0 before it).
        self.max_batch = 0
        self.eager_calls = 0
        self.report: WarmUpReport | None = None

    def _input(self, images: Tensor) -> Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def prefix(self, images: Tensor) -> tuple[Tensor, tuple[object, ...]]:
        """The layer's activation and the values the suffix also reads (no autograd)."""
        with torch.no_grad(), self._autocast():
            outputs = self._guarded(self._prefix, self.split.prefix, self._input(images))
        activation, *carried = outputs
        return activation, tuple(carried)

    def suffix(self, activation: Tensor, carried: tuple[object, ...]) -> Tensor:
        """Logits from an activation, eagerly, recording autograd when grad mode is on."""
        with self._autocast():
            return self.split.suffix(activation, *carried)

    def logits(self, images: Tensor) -> Tensor:
        """Logits of a plain forward through both compiled halves."""
        with torch.no_grad(), self._autocast():
            activation, *carried = self._guarded(self._prefix, self.split.prefix, self._input(images))
            return self._guarded(self._suffix, self.split.suffix, activation, *carried)

    def _guarded(self, compiled: Callable[..., object], eager: Callable[..., object], *args: object) -> object:
        """The compiled call; after warm-up, a call that would compile again runs `eager` instead."""
        if not self._warm:
            return compiled(*args)
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return compiled(*args)
        except RuntimeError as exc:
            if "recompil" not in str(exc).lower():
                raise
            self.eager_calls += 1
            if self.eager_calls == 1:
                log.warning("layer %s: an input the warm-up did not compile ran eagerly: %s", self.layer, exc)
            return eager(*args)

    def warm_up(self, example: Tensor, max_batch: int, eager: Callable[[Tensor], Tensor]) -> WarmUpReport:
        """Compile every graph a batch of 1..max_batch needs and check the logits against `eager`.

        Batch 1 gets its own graph, 2 and 3 make the batch dimension dynamic; kernels may still guard on ranges
        of it (oneDNN choices at 16, say), so the warm-up also runs the sizes around each power of two and
        max_batch, where such thresholds sit, and compiles whatever graph they ask for.
        """
        started = time.perf_counter()
        error = 0.0
        for size in warm_up_sizes(max_batch):
            images = noise(example, size)
            compiled = self.logits(images).float()
            with torch.no_grad():
                reference = eager(images).float()
            error = max(error, (compiled - reference).abs().max().item())
        compile_s = time.perf_counter() - started
        self._warm = True
        self.max_batch = max_batch
        self.report = WarmUpReport(compile_s, error)
        return self.report


def warm_up_sizes(max_batch: int) -> list[int]:
    """1, 2, 3, each power of two up to max_batch with its neighbours, and max_batch."""
    sizes = {1, 2, 3, max_batch}
    power = 4
    while power <= max_batch:
        sizes |= {power - 1, power, power + 1}
        power *= 2
    return sorted(size for size in sizes if size <= max_batch)


def noise(example: Tensor, batch: int) -> Tensor:
    """`batch` seeded standard-normal images of `example`'s shape, on its device."""
    generator = torch.Generator().manual_seed(batch)
    return torch.randn((batch, *example.shape[1:]), generator=generator).to(example.device)
