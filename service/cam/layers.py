"""Finding target layers: dotted module paths, call counts and the automatic default layer."""

from __future__ import annotations

import difflib
import threading
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from service.cam.errors import UnknownLayerError


@dataclass(frozen=True)
class LayerTrace:
    """What one forward pass revealed about the model's modules.

    `calls[name]` is how many times the module runs per forward; `spatial` lists, in the order the
    calls finished, the modules whose output is a 4-D map with spatial extent (h * w > 1).
    """

    calls: dict[str, int]
    spatial: tuple[str, ...]

    @property
    def default_layer(self) -> str:
        """The last feature map with spatial extent: the tensor that feeds global pooling."""
        if not self.spatial:
            raise UnknownLayerError("the model produces no 4-D feature map with spatial extent")
        return self.spatial[-1]


def trace_layers(model: nn.Module, example: Tensor) -> LayerTrace:
    """Run one no-grad forward on `example` and record module calls (this thread only)."""
    owner = threading.get_ident()
    calls: Counter[str] = Counter()
    spatial: list[str] = []

    def make_hook(name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if threading.get_ident() != owner:
                return
            calls[name] += 1
            if isinstance(output, Tensor) and output.dim() == 4 and output.shape[2] * output.shape[3] > 1:
                if name in spatial:
                    spatial.remove(name)
                spatial.append(name)

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return LayerTrace(calls=dict(calls), spatial=tuple(spatial))


def resolve_layer(model: nn.Module, name: str, trace: LayerTrace | None = None) -> nn.Module:
    """Return the module at dotted path `name`, or raise UnknownLayerError listing candidates."""
    modules = dict(model.named_modules())
    module = modules.get(name) if name else None
    if module is not None:
        if trace is not None and name not in trace.calls:
            raise UnknownLayerError(
                f"layer {name!r} exists but does not run in the model's forward pass",
                candidates=layer_candidates(trace),
            )
        return module
    candidates = layer_candidates(trace) if trace else [n for n in modules if n][-10:]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
    hint = close or candidates
    raise UnknownLayerError(f"unknown layer {name!r}; candidates: {', '.join(hint)}", candidates=hint)


def layer_candidates(trace: LayerTrace, limit: int = 10) -> list[str]:
    """The last `limit` modules with spatial feature maps, deepest last."""
    return list(trace.spatial[-limit:])
