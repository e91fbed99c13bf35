"""Reading weight files safely (safetensors, or pickles with weights_only=True) and fitting them to a module."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from camserve.models.errors import ModelConfigError

SAFETENSORS_SUFFIX = ".safetensors"


def existing(path: Path | None, what: str = "weights file") -> Path:
    """`path` when it is a file, else a ModelConfigError."""
    if path is not None and path.is_dir():
        raise ModelConfigError(f"{what} {path} is a directory, not a file")
    if path is None or not path.is_file():
        raise ModelConfigError(f"{what} {path} does not exist")
    return path


def load_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """A state dict from a `.safetensors` file, or from a `.pth`/`.bin`/... pickle loaded with `weights_only=True`:
    tensors and containers only, never arbitrary objects. A {"state_dict": {...}} checkpoint gives its inner dict."""
    path = existing(path)
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelConfigError(f"{path} is not a valid safetensors file ({exc})") from exc
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if path.stat().st_size == 0:
            raise ModelConfigError(f"{path} is empty (0 bytes)") from exc
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelConfigError(f"{path} is not a plain state dict (refused by weights-only loading: {reason})") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelConfigError(f"{path} does not hold a state dict of tensors")
    return state if isinstance(state, OrderedDict) else OrderedDict(state)  # keeps a saved `_metadata`


def classes_in_state(state: Mapping[str, torch.Tensor], head: str) -> int | None:
    """The class count of the weights: the first dimension of `{head}.weight`, None when absent."""
    weight = state.get(f"{head}.weight")
    return int(weight.shape[0]) if weight is not None and weight.dim() >= 2 else None


def input_channels(state: Mapping[str, torch.Tensor], conv: str) -> int | None:
    """The input channels of the weights' convolution `conv`: the second dimension of `{conv}.weight` (a 4-D
    kernel), None when absent."""
    weight = state.get(f"{conv}.weight")
    return int(weight.shape[1]) if weight is not None and weight.dim() == 4 else None


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], architecture: str) -> None:
    """Load strictly: missing, unexpected or mis-shaped keys are a ModelConfigError naming the first few.

    Weights without module versions (safetensors keeps none) are taken to be in the format of the modules
    as built now, for modules that read the version when loading (e.g. torchvision's MNASNet).
    """
    if getattr(state, "_metadata", None) is None:
        state = OrderedDict(state)
        state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state)  # torch's own rules decide what fits (lazy modules, legacy buffers, ...)
    except RuntimeError as exc:
        raise ModelConfigError(f"weights do not fit architecture {architecture}: {_misfit(model, state)}") from exc


def _misfit(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """The keys a strict load refused, counted, a few named: missing, unexpected, mis-shaped."""
    own = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in own.items() if not isinstance(v, nn.parameter.UninitializedParameter)}
    wrong = [key for key, value in state.items() if key in shapes and tuple(value.shape) != shapes[key]]
    problems = [
        few(what, keys)
        for what, keys in (
            ("missing", [key for key in own if key not in state]),
            ("unexpected", [key for key in state if key not in own]),
            ("mis-shaped", [f"{key} {tuple(state[key].shape)} (the model has {shapes[key]})" for key in wrong]),
        )
        if keys
    ]
    return "; ".join(problems) or "torch refused them"


def few(what: str, keys: list[str], shown: int = 5) -> str:
    """'N missing keys: a, b, c, ... and M more' (a message stays one readable line)."""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} {what} key{'s' if len(keys) != 1 else ''}: {', '.join(keys[:shown])}{more}"
