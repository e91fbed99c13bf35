"""RISE (Petsiuk et al. 2018): saliency from random masks of the input, for any model that gives probabilities.

N binary grids of `GRID` x `GRID` cells (each cell kept with probability `KEEP`) are upsampled bilinearly to one cell
more than the input, shifted by a random offset below one cell and cropped to the input, so mask edges are smooth
and fall anywhere. The saliency of class c is sum_i f_c(I * M_i) M_i / (N * KEEP), f_c the model's probability
(its head's), at input resolution. The masks come from a generator seeded with `seed`, made chunk by chunk in the
same order for every image, so the same request gives the same map. No layer is read: the map is the input's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from camserve.cam.family import LayerInput, Reruns
from camserve.cam.perturbation import PerturbationMethod

GRID = 7
KEEP = 0.5
DEFAULT_MASKS = 1000
SEED = 0


class RISE(PerturbationMethod):
    """RISE with `masks` random masks per image (one extra forward each)."""

    name: ClassVar[str] = "rise"
    reads_layer: ClassVar[bool] = False

    def __init__(self, masks: int = DEFAULT_MASKS, seed: int = SEED) -> None:
        if masks < 1:
            raise ValueError(f"masks must be at least 1, got {masks}")
        self.masks, self.seed = masks, seed

    def with_masks(self, masks: int) -> RISE:
        return RISE(masks, self.seed)

    def extra_forwards(self, images: int, channels: Sequence[int], cells: Sequence[int] = ()) -> int:
        return images * self.masks * max(1, len(channels))

    def random_masks(self, generator: torch.Generator, count: int, size: tuple[int, int]) -> Tensor:
        """`count` smooth masks [count, 1, H, W] in [0, 1] from `generator` (on the CPU)."""
        height, width = size
        cell = (math.ceil(height / GRID), math.ceil(width / GRID))
        grids = (torch.rand(count, 1, GRID, GRID, generator=generator) < KEEP).float()
        upsampled = F.interpolate(grids, size=((GRID + 1) * cell[0], (GRID + 1) * cell[1]), mode="bilinear")
        shifts = (
            torch.randint(0, cell[0], (count,), generator=generator),
            torch.randint(0, cell[1], (count,), generator=generator),
        )
        return torch.stack(
            [upsampled[i, :, y : y + height, x : x + width] for i, (y, x) in enumerate(zip(*shifts, strict=True))]
        )

    def layer_map(self, layer: LayerInput, reruns: Reruns) -> Tensor:
        plan, images = layer.plan, layer.images
        size = (int(images.shape[-2]), int(images.shape[-1]))
        saliency = torch.zeros((len(plan), size[0] * size[1]), device=images.device)
        for image in sorted(set(plan.images)):
            rows = [n for n, i in enumerate(plan.images) if i == image]
            classes = torch.tensor([plan.classes[n] for n in rows], device=images.device)
            generator = torch.Generator().manual_seed(self.seed)
            for start in range(0, self.masks, reruns.batch_size):
                count = min(reruns.batch_size, self.masks - start)
                masks = self.random_masks(generator, count, size).to(images.device, images.dtype)
                scores = reruns.probability(reruns.logits(images[image : image + 1] * masks))  # [count, classes]
                saliency[rows] += scores[:, classes].T.float() @ masks.flatten(1).float()
        return torch.relu(saliency.view(len(plan), *size) / (self.masks * KEEP))
