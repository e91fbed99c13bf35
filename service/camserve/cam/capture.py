"""Per-call, per-thread capture of layer activations, with autograd recording only from the layer on.

Hooks are registered for one forward pass and removed afterwards. Each hook acts only on the thread
that registered it, so concurrent callers on one model never see each other's activations.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from camserve.cam.errors import UnknownLayerError
from camserve.cam.layouts import FeatureLayout


class ActivationCapture:
    """Records the output of each target module at its last call in a forward pass.

    Run the forward under `torch.no_grad()`: at the first target reached, the activation is detached,
    marked as requiring grad and grad mode is switched on, so autograd records only the part of the
    network between the target layer(s) and the logits. The hooked output is replaced by a clone so
    that in-place operations after the layer cannot modify the recorded activation. With `record=False`
    (methods that need no gradient) nothing is recorded: the activations are only kept.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        calls: Mapping[str, int],
        layouts: Mapping[str, FeatureLayout],
        *,
        record: bool = True,
    ) -> None:
        self._modules = dict(modules)
        self._record = record
        self._layouts = layouts
        self._expected = {name: max(1, calls.get(name, 1)) for name in self._modules}
        self._seen: Counter[str] = Counter()
        self._owner = threading.get_ident()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.activations: dict[str, Tensor] = {}

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> Tensor | None:
            if threading.get_ident() != self._owner:
                return None
            self._seen[name] += 1
            if self._seen[name] != self._expected[name]:
                return None
            if not isinstance(output, Tensor):
                raise UnknownLayerError(f"layer {name!r} outputs {type(output).__name__}, not a tensor")
            self._layouts[name].check(output.shape, name)
            if self._record and not (torch.is_grad_enabled() and output.requires_grad):  # first, or off the graph
                output = output.detach().requires_grad_(True)
                torch.set_grad_enabled(True)
            self.activations[name] = output
            return output.clone()

        return hook

    def __enter__(self) -> ActivationCapture:
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def check_complete(self) -> None:
        """Raise if a target module did not run during the forward pass."""
        missing = [n for n in self._modules if n not in self.activations]
        if missing:
            raise UnknownLayerError(f"layer(s) {', '.join(map(repr, missing))} did not run in the forward pass")


class _GuidedGate(torch.autograd.Function):
    """Identity forward; backward lets only positive gradients through (guided backpropagation)."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad.clamp(min=0)


_ATEN = torch.ops.aten
#: Activation functions guided backpropagation gates, as the functions a forward calls (modules call these), and
#: as the ATen operators an exported program (`torch.export`) calls instead.
GUIDED_FUNCTIONS: frozenset[object] = frozenset(
    {
        F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.relu6, F.hardtanh, F.leaky_relu, F.elu,
        F.selu, F.celu, F.gelu, F.silu, F.hardswish, F.mish,
        _ATEN.relu.default, _ATEN.relu_.default, _ATEN.hardtanh.default, _ATEN.hardtanh_.default,
        _ATEN.leaky_relu.default, _ATEN.elu.default, _ATEN.selu.default, _ATEN.celu.default, _ATEN.gelu.default,
        _ATEN.silu.default, _ATEN.silu_.default, _ATEN.hardswish.default, _ATEN.hardswish_.default,
        _ATEN.mish.default,
    }
)  # fmt: skip


class _GuidedMode(TorchFunctionMode):
    """Passes the output of every activation function through `_GuidedGate` (this thread only)."""

    def __init__(self) -> None:
        super().__init__()
        self.gated = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        if func in GUIDED_FUNCTIONS and isinstance(output, Tensor) and output.requires_grad:
            self.gated += 1
            return _GuidedGate.apply(output)
        return output


@contextmanager
def guided_backprop() -> Iterator[_GuidedMode]:
    """Within the block, every activation this thread runs back-propagates only positive gradients.

    With ReLU this is guided backpropagation (Springenberg et al. 2015): the activation's own backward
    zeroes where its input was inactive and the gate drops negative gradients. Other activations (GELU,
    SiLU, Hardswish, ...) get the same gate after their own derivative, the usual generalization. Module
    and functional activations are both caught, since modules call the functional form. `gated` counts
    the gated calls; a forward with none cannot be guided.
    """
    with _GuidedMode() as mode:
        yield mode
