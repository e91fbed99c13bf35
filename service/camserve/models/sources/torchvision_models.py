"""kind = "torchvision": any classification architecture of `torchvision.models` with a local state dict."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torchvision
from pydantic import Field, model_validator
from torch import nn

from camserve.models.errors import ModelConfigError
from camserve.models.labels import imagenet_labels_if
from camserve.models.preprocessing import Preprocessing
from camserve.models.sources.base import Built, LocalPath, Source
from camserve.models.weights import classes_in_state, input_channels, load_into, load_state_dict

DEFAULT_CLASSES = 1000  # torchvision's default `num_classes` for every classification architecture


class TorchvisionSource(Source):
    """`architecture` from `torchvision.models.list_models`; `weights` a `.safetensors` or `.pth` state dict.

    The class count is read from the weights (`num_classes`, if set, must agree), and so are the input channels:
    weights whose first convolution takes one channel get a model whose first convolution does. Preprocessing
    defaults are those of the architecture's default torchvision weights (size of their centre crop, mean, std,
    filter).
    """

    kind: Literal["torchvision"]
    architecture: str | None = None
    weights: LocalPath | None = None
    num_classes: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _needs_architecture_and_weights(self) -> TorchvisionSource:
        if not (self.architecture and self.weights):
            raise ValueError("a torchvision model needs `architecture` and `weights` (a state dict file)")
        return self

    def build(self) -> Built:
        arch = str(self.architecture)
        available = set(torchvision.models.list_models(module=torchvision.models))
        if arch not in available:
            close = difflib.get_close_matches(arch.lower().replace("-", "_"), sorted(available), n=5, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else f"e.g. {', '.join(sorted(available)[:8])}, ..."
            raise ModelConfigError(f"{arch!r} is not a torchvision classification model; {hint}")
        state = load_state_dict(self.weights)  # type: ignore[arg-type]  # checked by the validator
        kwargs = _structure_kwargs(arch, state)
        num_classes = self.num_classes or _classes_in_weights(arch, state, kwargs) or DEFAULT_CLASSES
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        first = next((name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)), None)
        channels = input_channels(state, first) if first else None
        if first and channels == 1:
            _take_one_channel(model, first)
        load_into(model, state, arch)
        said = f"the weights of its first convolution {first}" if channels is not None else None
        preprocessing = dataclasses.replace(_default_preprocessing(arch), channels=channels or 3)
        return Built(model, arch, preprocessing, imagenet_labels_if(num_classes), channels_from=said)


def _take_one_channel(model: nn.Module, name: str) -> None:
    """Replace the convolution `name` of `model` by one alike that takes one input channel."""
    conv = model.get_submodule(name)
    assert isinstance(conv, nn.Conv2d)
    parent, _, leaf = name.rpartition(".")
    one = nn.Conv2d(
        1,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]  # a tuple, as Conv2d keeps it
        conv.stride,  # type: ignore[arg-type]
        conv.padding,  # type: ignore[arg-type]
        conv.dilation,  # type: ignore[arg-type]
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    setattr(model.get_submodule(parent) if parent else model, leaf, one)


def _structure_kwargs(arch: str, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Inception and GoogLeNet: auxiliary heads exist only when the weights have them."""
    if arch.startswith(("inception", "googlenet")):
        return {"aux_logits": any(k.lower().startswith("aux") for k in state), "init_weights": False}
    return {}


def _classes_in_weights(arch: str, state: Mapping[str, torch.Tensor], kwargs: dict[str, Any]) -> int | None:
    """The head is the last module of the default model whose weight has the default class count first."""
    try:
        with torch.device("meta"):
            default = torchvision.models.get_model(arch, weights=None, **kwargs)
    except Exception:  # an architecture whose construction needs real tensors
        default = torchvision.models.get_model(arch, weights=None, **kwargs)
    heads = [
        name
        for name, module in default.named_modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.shape[0] == DEFAULT_CLASSES
    ]
    return classes_in_state(state, heads[-1]) if heads else None


def _default_preprocessing(arch: str) -> Preprocessing:
    """Crop size, mean, std and filter of the architecture's default weights (224, ImageNet, bilinear if none)."""
    try:
        transforms = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        side = int(transforms.crop_size[0])
        return Preprocessing(
            (side, side), tuple(transforms.mean), tuple(transforms.std), str(transforms.interpolation.value)
        )
    except Exception:
        return Preprocessing((224, 224))
