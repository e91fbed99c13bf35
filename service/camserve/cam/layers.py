"""Finding target layers: dotted module paths, call counts, feature layouts and the default layer."""

from __future__ import annotations

import difflib
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from camserve.cam.capture import ActivationCapture
from camserve.cam.errors import UnknownLayerError
from camserve.cam.layouts import FeatureLayout, detect_layout
from camserve.cam.scaling import FLOAT16_SCALE

#: How many of the deepest feature layers the default-layer probe looks at.
DEFAULT_PROBE_LAYERS = 48


@dataclass(frozen=True)
class LayerTrace:
    """What one forward pass revealed about the model's modules.

    `calls[name]` is how many times the module runs per forward; `shapes[name]` its output shape at the
    last call (batch first), in the order the last calls finished; `layouts` holds the modules whose
    output is a feature map or a token grid, in the same order; `default` is the layer chosen by
    `choose_default_layer`; `modules[name]` the module's class name.
    """

    calls: dict[str, int]
    shapes: dict[str, tuple[int, ...]]
    layouts: dict[str, FeatureLayout]
    input_size: tuple[int, int]
    default: str | None = None
    modules: dict[str, str] = field(default_factory=dict)

    @property
    def spatial(self) -> tuple[str, ...]:
        """Layers usable as CAM layers, deepest last."""
        return tuple(self.layouts)

    @property
    def default_layer(self) -> str:
        """The informative default layer (see `choose_default_layer`), else the last feature layer."""
        if self.default is not None:
            return self.default
        if not self.layouts:
            raise UnknownLayerError("the model produces no feature map or token grid with spatial extent")
        return self.spatial[-1]

    def channels(self, name: str) -> int:
        """The channel count of CAM layer `name` (UnknownLayerError when it is not one)."""
        return self.layout(name).channels(self.shapes[name])

    def layout(self, name: str) -> FeatureLayout:
        """The layout of layer `name`, or UnknownLayerError naming the layer and its output shape."""
        found = self.layouts.get(name)
        if found is None:
            shape = self.shapes.get(name)
            what = f"outputs {list(shape[1:])} per image" if shape is not None else "outputs no tensor"
            height, width = self.input_size
            raise UnknownLayerError(
                f"layer {name!r} {what} (for {height}x{width} inputs); a CAM layer must output a feature map "
                "[C, h, w] or [h, w, C] or tokens [N, C] on a patch grid, per image",
                candidates=layer_candidates(self),
            )
        return found


def trace_layers(model: nn.Module, probe: Tensor) -> LayerTrace:
    """Run one no-grad forward on `probe` (at least 2 images) and record calls, shapes and layouts."""
    owner = threading.get_ident()
    calls: Counter[str] = Counter()
    shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []

    def make_hook(name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if threading.get_ident() != owner:
                return
            calls[name] += 1
            if isinstance(output, Tensor):
                shapes[name] = tuple(output.shape)
                if name in order:
                    order.remove(name)
                order.append(name)

        return hook

    named = [(n, m) for n, m in model.named_modules() if n]
    handles = [m.register_forward_hook(make_hook(n)) for n, m in named]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    batch, input_size = probe.shape[0], (int(probe.shape[-2]), int(probe.shape[-1]))
    layouts: dict[str, FeatureLayout] = {}
    grids: list[tuple[int, int]] = []
    for name in order:  # spatial maps first, so token grids can prefer a grid the patch embedding made
        found = detect_layout(shapes[name], batch, input_size) if len(shapes[name]) == 4 else None
        if found is not None:
            grids.append(found.grid)
    for name in order:
        found = detect_layout(shapes[name], batch, input_size, grids)
        if found is not None:
            layouts[name] = found
    kinds = {n: type(m).__name__ for n, m in named if n in calls}
    ordered = {name: shapes[name] for name in order}
    return LayerTrace(calls=dict(calls), shapes=ordered, layouts=layouts, input_size=input_size, modules=kinds)


def choose_default_layer(
    model: nn.Module,
    trace: LayerTrace,
    probe: Tensor,
    autocast: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> str | None:
    """The deepest layer whose map can be non-zero: its gradient on the grid is not identically zero.

    One forward captures the deepest feature layers and one backward of the top-1 logits gives all their
    gradients. In a ViT whose head reads only the class token, the last blocks give the patch tokens no
    gradient; the search walks back to the last block's input norm. Token layers count only when they
    are normalization layers (the residual stream, not attention projections); feature maps always do.
    """
    names = [
        n for n in trace.spatial if trace.layouts[n].kind != "tokens" or "norm" in trace.modules.get(n, "").lower()
    ][-DEFAULT_PROBE_LAYERS:]
    if not names:
        return None
    modules = dict(model.named_modules())
    with torch.inference_mode(False), torch.no_grad():
        capture = ActivationCapture({n: modules[n] for n in names}, trace.calls, trace.layouts)
        with capture, autocast():
            logits = model(probe)
        captured = [n for n in names if n in capture.activations]
        if not captured:
            return None
        # scaled so that float16 gradients do not flush to zero; only "any non-zero" is read (inf and nan count)
        top = logits.float().max(dim=1).values.sum() * FLOAT16_SCALE
        grads = torch.autograd.grad(top, [capture.activations[n] for n in captured], allow_unused=True)
    for name, grad in reversed(list(zip(captured, grads, strict=True))):
        if grad is not None and bool(trace.layouts[name].to_nchw(grad, name).ne(0).any()):
            return name
    return None


def resolve_layer(model: nn.Module, name: str, trace: LayerTrace | None = None) -> nn.Module:
    """Return the module at dotted path `name`, or raise UnknownLayerError listing candidates."""
    try:  # a walk down the path: listing every module costs ~0.5 ms per call on EfficientNet
        module = model.get_submodule(name) if name else None
    except AttributeError:
        module = None
    if module is not None:
        if trace is not None and name not in trace.calls:
            raise UnknownLayerError(
                f"layer {name!r} exists but does not run in the model's forward pass",
                candidates=layer_candidates(trace),
            )
        return module
    modules = dict(model.named_modules())
    candidates = layer_candidates(trace) if trace else [n for n in modules if n][-10:]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
    hint = close or candidates
    raise UnknownLayerError(f"unknown layer {name!r}; candidates: {', '.join(hint)}", candidates=hint)


def layer_candidates(trace: LayerTrace, limit: int = 10) -> list[str]:
    """The last `limit` modules with feature maps or token grids, deepest last."""
    return list(trace.spatial[-limit:])
