"""Extra forwards for perturbation methods: full forwards in chunks, and the network after a layer.

The part after a layer comes from `split.py` (the exported graph cut at the layer), built lazily per layer
and kept for a bounded number of layers. A model that does not export, or a layer it cannot be cut at, falls
back to a hook that replaces the layer's output during a full forward (logged once): the same logits, at the
cost of re-running the layers before it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from camserve.cam.family import LayerInput
from camserve.cam.heads import Head, probabilities
from camserve.cam.pauses import pause
from camserve.cam.runtime import RuntimeTable
from camserve.cam.split import ModelSplit, SplitError, batch_multiple, carried_kinds, export_model, split_model

log = logging.getLogger(__name__)

#: Bytes of ablated activations one suffix forward takes at most (at least `batch_size` rows go anyway).
SUFFIX_BUDGET_BYTES = 64 * 1024 * 1024
#: Most rows one suffix forward takes.
MAX_SUFFIX_ROWS = 1024
#: Layers whose split is kept per engine.
CACHED_SPLITS = 8


class EngineReruns:
    """`family.Reruns` for one engine's model. Thread-safe; splits are built on first use and cached."""

    def __init__(
        self,
        model: nn.Module,
        autocast: Callable[[], AbstractContextManager[object]],
        batch_size: int = 32,
        head: Head = "softmax",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.autocast = autocast
        self.batch_size = batch_size
        self.head: Head = head
        self._lock = threading.Lock()
        self._exported: fx.GraphModule | None = None
        self._export_error: SplitError | None = None
        self._splits: OrderedDict[str, _SplitPlan | None] = OrderedDict()
        #: The engine's runtimes: full forwards run on the backend serving their batch size.
        self.runtime: RuntimeTable | None = None

    def logits(self, inputs: Tensor) -> Tensor:
        """A full forward without autograd: on the engine's runtime for this batch size, else eager with 4-D CPU
        inputs channels-last (measured ~1.3x faster for CNNs). Each call is one chunk: other work may run first."""
        pause()
        if self.runtime is not None:
            logits = self.runtime.attempt(inputs.shape[0], lambda backend: backend.logits(inputs).float())
            if logits is not None:
                return logits
        if inputs.device.type == "cpu" and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self.autocast():
            out = self.model(inputs).float()
        return out.clone()  # a normal tensor, usable outside inference mode

    def probability(self, logits: Tensor) -> Tensor:
        """The model's probabilities for `logits` (softmax, or sigmoid for a multi-label or binary head)."""
        return probabilities(logits, self.head)

    def suffix(self, layer: LayerInput) -> _SplitSuffix | _HookSuffix:
        plan = self._split(layer)
        if plan is None:
            module = dict(self.model.named_modules())[layer.name]
            return _HookSuffix(self.model, module, layer.calls, layer.images, self.autocast, self.batch_size)
        return _SplitSuffix(plan, layer.images, self.autocast, suffix_rows(layer.activation, self.batch_size))

    def adopt(self, split: ModelSplit) -> None:
        """Serve `split.layer`'s reruns through `split` (made elsewhere, e.g. loaded from a cache)."""
        with self._lock:
            self._splits[split.layer] = _SplitPlan.of(split)
            while len(self._splits) > CACHED_SPLITS:
                self._splits.popitem(last=False)

    def _split(self, layer: LayerInput) -> _SplitPlan | None:
        """The cached split at `layer.name`, or None where the model or the layer cannot be split."""
        with self._lock:
            if layer.name in self._splits:
                self._splits.move_to_end(layer.name)
                return self._splits[layer.name]
            plan = None
            try:
                plan = _SplitPlan.of(split_model(self._export_locked(layer.images), layer.name))
            except SplitError as exc:
                log.warning("layer %s: no split (%s); ablations re-run the whole network", layer.name, exc)
            self._splits[layer.name] = plan
            while len(self._splits) > CACHED_SPLITS:
                self._splits.popitem(last=False)
            return plan

    def adopt_export(self, graph: fx.GraphModule) -> None:
        """Split `graph` (the model exported elsewhere, batch dimension dynamic) instead of exporting the model."""
        with self._lock:
            self._exported, self._export_error = graph, None

    def export(self, images: Tensor) -> fx.GraphModule:
        """The model's exported graph, made once from `images`' shape and shared by every split of this engine
        (the fast path's included); SplitError, also on later calls, when the model does not export."""
        with self._lock:
            return self._export_locked(images)

    def _export_locked(self, images: Tensor) -> fx.GraphModule:
        if self._export_error is not None:
            raise self._export_error
        if self._exported is None:
            example = images[:1].repeat(2, *([1] * (images.dim() - 1)))  # 2: the batch dimension stays dynamic
            try:
                self._exported = export_model(self.model, example)
            except SplitError as exc:
                self._export_error = exc
                raise
        return self._exported


def suffix_rows(activation: Tensor, batch_size: int) -> int:
    """Ablated copies per suffix forward: as many as `SUFFIX_BUDGET_BYTES` holds, at least `batch_size`."""
    per_row = max(1, activation[0].numel() * activation.element_size())
    return max(batch_size, min(MAX_SUFFIX_ROWS, SUFFIX_BUDGET_BYTES // per_row))


@dataclass(frozen=True)
class _SplitPlan:
    """A split, and how each value it carries past the layer depends on the batch."""

    split: ModelSplit
    #: Per carried value: "rows" (a tensor with one row per image), "batch" or "batch*k" (k times the batch
    #: size), "fixed".
    kinds: tuple[str, ...]

    @classmethod
    def of(cls, split: ModelSplit) -> _SplitPlan:
        return cls(split, carried_kinds(split))


class _SplitSuffix:
    """Ablated rows of one image through the split's suffix; the prefix runs once, only if tensors are carried."""

    def __init__(
        self, plan: _SplitPlan, images: Tensor, autocast: Callable[[], AbstractContextManager[object]], rows: int
    ) -> None:
        self.plan = plan
        self.autocast = autocast
        self.batch_size = rows
        self._carried: tuple[object, ...] = ()
        if any(batch_multiple(kind) is None for kind in plan.kinds):
            with torch.inference_mode(), autocast():
                _, *carried = plan.split.prefix(images)
            self._carried = tuple(carried)

    def __call__(self, image: int, rows: Tensor) -> Tensor:
        pause()  # each chunk of ablated rows: other work may run first
        count = rows.shape[0]
        carried: list[object] = []
        for i, kind in enumerate(self.plan.kinds):
            if (multiple := batch_multiple(kind)) is not None:
                carried.append(multiple * count)
            elif kind == "rows":
                value = self._carried[i]
                assert isinstance(value, Tensor)
                carried.append(value[image : image + 1].expand(count, *value.shape[1:]))
            else:
                carried.append(self._carried[i])
        with torch.inference_mode(), self.autocast():
            out = self.plan.split.suffix(rows, *carried).float()
        return out.clone()


class _HookSuffix:
    """The fallback: full forwards of the image repeated, the layer's output (at its last call) replaced by the rows."""

    def __init__(
        self,
        model: nn.Module,
        module: nn.Module,
        calls: int,
        images: Tensor,
        autocast: Callable[[], AbstractContextManager[object]],
        rows: int,
    ) -> None:
        self.model, self.module, self.calls, self.images, self.autocast = model, module, max(1, calls), images, autocast
        self.batch_size = rows

    def __call__(self, image: int, rows: Tensor) -> Tensor:
        pause()  # before this call's hook exists: other work may run first
        owner, seen = threading.get_ident(), [0]

        def replace(_module: nn.Module, _inputs: object, output: object) -> Tensor | None:
            if threading.get_ident() != owner:
                return None
            seen[0] += 1
            return rows if seen[0] == self.calls else None

        inputs = self.images[image : image + 1].expand(rows.shape[0], *self.images.shape[1:])
        handle = self.module.register_forward_hook(replace)
        try:
            with torch.inference_mode(), self.autocast():
                out = self.model(inputs).float()
        finally:
            handle.remove()
        return out.clone()
