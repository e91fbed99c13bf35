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
from torch import Tensor, nn

from service.cam.errors import UnknownLayerError


class ActivationCapture:
    """Records the output of each target module at its last call in a forward pass.

    Run the forward under `torch.no_grad()`: at the first target reached, the activation is detached,
    marked as requiring grad and grad mode is switched on, so autograd records only the part of the
    network between the target layer(s) and the logits. The hooked output is replaced by a clone so
    that in-place operations after the layer cannot modify the recorded activation.
    """

    def __init__(self, modules: Mapping[str, nn.Module], calls: Mapping[str, int]) -> None:
        self._modules = dict(modules)
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
            if not isinstance(output, Tensor) or output.dim() != 4:
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise UnknownLayerError(
                    f"layer {name!r} outputs {shape}; a CAM layer must output a [B, K, h, w] feature map"
                )
            if not torch.is_grad_enabled():
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


GUIDED_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)


@contextmanager
def guided_backprop(model: nn.Module) -> Iterator[None]:
    """Within the block, this thread's ReLU/ReLU6 modules back-propagate only positive gradients.

    Combined with the activation's own backward (which zeroes where the input was inactive) this is
    guided backpropagation (Springenberg et al. 2015). Functional activations are not affected.
    """
    owner = threading.get_ident()

    def hook(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor | None:
        if threading.get_ident() != owner or not torch.is_grad_enabled():
            return None
        return _GuidedGate.apply(output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, GUIDED_ACTIVATIONS)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
