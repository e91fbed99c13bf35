"""What an explanation is, and the parts every engine shares: maps of methods that read no layer, and fusion."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from camserve.cam.errors import InvalidTargetError
from camserve.cam.family import Method, Reruns, input_layer
from camserve.cam.heads import Head
from camserve.cam.methods import get_method
from camserve.cam.pairs import PairPlan, TargetSpec, choose_pairs
from camserve.cam.render import minmax_normalize, resize_maps


@dataclass
class Explanation:
    """Maps for every (image, target) pair of a batch, and the logits of the same forward pass.

    `maps` is the raw map (after ReLU, before normalization) for a single layer; for several layers
    it is the fusion (each layer's map min-max normalized, resized to the largest, averaged); for
    guided Grad-CAM it is max_c |guided backprop * Grad-CAM| at input resolution.
    """

    method: str
    layers: tuple[str, ...]
    counterfactual: bool
    logits: Tensor
    image_index: Tensor
    class_index: Tensor
    maps: Tensor
    layer_maps: dict[str, Tensor] = field(default_factory=dict)
    guided: Tensor | None = None
    #: (image, class) of each row on the host, the same as image_index/class_index without a device sync.
    pairs: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        cam: Method,
        layers: tuple[str, ...],
        logits: Tensor,
        plan: PairPlan,
        maps: Tensor,
        *,
        counterfactual: bool = False,
        layer_maps: dict[str, Tensor] | None = None,
        guided: Tensor | None = None,
    ) -> Explanation:
        """The explanation of `plan`'s pairs by `cam` at `layers`."""
        return cls(
            method=cam.name,
            layers=layers,
            counterfactual=counterfactual,
            logits=logits,
            image_index=plan.image_index,
            class_index=plan.class_index,
            maps=maps,
            layer_maps=layer_maps or {},
            guided=guided,
            pairs=list(zip(plan.images, plan.classes, strict=True)),
        )


def checked_method(
    method: str | Method, images: Tensor, *, counterfactual: bool, layers: bool, runs: Callable[[Method], None]
) -> Method:
    """The method `method` names, after its own checks, the engine's (`runs`, its `check_method`) and the batch's
    shape (InvalidTargetError unless [B, C, H, W])."""
    cam = method if isinstance(method, Method) else get_method(method)
    cam.check(counterfactual=counterfactual, layers=layers)
    runs(cam)
    if images.dim() != 4:
        raise InvalidTargetError(f"images must be a [B, C, H, W] batch, got shape {tuple(images.shape)}")
    return cam


def explain_input(
    cam: Method,
    images: Tensor,
    logits: Tensor,
    reruns: Reruns,
    targets: TargetSpec,
    head: Head,
    above: float | None,
    most: int,
) -> Explanation:
    """The explanation by a method that reads no layer (RISE): `logits` [B, classes] of `images`, maps from
    whole-model forwards through `reruns`; `layers` is empty."""
    logits = logits.float()
    plan = choose_pairs(targets, logits, head, above, most)
    with torch.no_grad():
        maps = cam.layer_map(input_layer(images, plan, logits), reruns)
    return Explanation.of(cam, (), logits, plan, maps)


def fuse(layer_maps: dict[str, Tensor]) -> Tensor:
    """Average of per-layer min-max normalized maps, resized to the largest layer."""
    size = max((tuple(m.shape[-2:]) for m in layer_maps.values()), key=lambda s: s[0] * s[1])
    stacked = [resize_maps(minmax_normalize(m), size) for m in layer_maps.values()]
    return torch.stack(stacked).mean(dim=0)
