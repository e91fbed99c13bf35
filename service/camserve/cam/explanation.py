"""What an explanation is, and the parts every engine shares: maps of methods that read no layer, and fusion."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from camserve.cam.family import Method, Reruns, input_layer
from camserve.cam.heads import Head
from camserve.cam.pairs import TargetSpec, choose_pairs
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
    return Explanation(
        method=cam.name,
        layers=(),
        counterfactual=False,
        logits=logits,
        image_index=plan.image_index,
        class_index=plan.class_index,
        maps=maps,
        pairs=list(zip(plan.images, plan.classes, strict=True)),
    )


def fuse(layer_maps: dict[str, Tensor]) -> Tensor:
    """Average of per-layer min-max normalized maps, resized to the largest layer."""
    size = max((tuple(m.shape[-2:]) for m in layer_maps.values()), key=lambda s: s[0] * s[1])
    stacked = [resize_maps(minmax_normalize(m), size) for m in layer_maps.values()]
    return torch.stack(stacked).mean(dim=0)
