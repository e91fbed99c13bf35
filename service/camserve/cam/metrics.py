"""Metrics that judge saliency maps (pure torch).

Definitions follow the papers as summarised in the project's reference notes: pointing game (Zhang et
al. 2018), energy-based pointing game (Score-CAM), Average Drop / Increase in Confidence (Grad-CAM++),
deletion / insertion (Petsiuk et al., RISE 2018) and Spearman rank correlation for sanity checks
(Adebayo et al. 2018). The per-explanation pieces of the last two (masking, ranking, perturbing, AUC) live in
`camserve.cam.faithfulness`, which the service uses to score single explanations; this module averages them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from camserve.cam.faithfulness import auc, blurred, drop_increase, masked, perturb, pixel_ranks

__all__ = [
    "auc",
    "average_drop_increase",
    "box_to_mask",
    "deletion_curve",
    "deletion_insertion_auc",
    "energy_pointing_game",
    "insertion_curve",
    "instance_coverage",
    "pointing_game_accuracy",
    "pointing_game_hit",
    "spearman_rank_correlation",
]

ScoreFn = Callable[[Tensor], Tensor]  # normalized inputs [B, 3, H, W] -> class probabilities [B, C]


def _check_pair(saliency: Tensor, mask: Tensor) -> None:
    if saliency.dim() != 2 or saliency.shape != mask.shape:
        raise ValueError(f"saliency {tuple(saliency.shape)} and mask {tuple(mask.shape)} must both be [H, W]")


def box_to_mask(box: Sequence[float], height: int, width: int) -> Tensor:
    """Boolean [H, W] mask of box (x0, y0, x1, y1), x1/y1 exclusive, clipped to the image."""
    x0, y0, x1, y1 = (round(v) for v in box)
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[max(0, y0) : max(0, min(height, y1)), max(0, x0) : max(0, min(width, x1))] = True
    return mask


def pointing_game_hit(saliency: Tensor, mask: Tensor, tolerance: float = 15.0) -> bool:
    """Hit when an object pixel lies within `tolerance` px of the map's maximum (first in row-major order)."""
    _check_pair(saliency, mask)
    if not mask.any():
        raise ValueError("the ground-truth mask is empty")
    peak = int(torch.argmax(saliency.flatten()))
    row, col = divmod(peak, saliency.shape[1])
    rows, cols = torch.nonzero(mask, as_tuple=True)
    distance2 = (rows - row).double() ** 2 + (cols - col).double() ** 2
    return bool(distance2.min() <= tolerance**2)


def pointing_game_accuracy(hits_by_class: Mapping[object, Sequence[bool]]) -> float:
    """Mean over classes of hits / (hits + misses)."""
    rates = [sum(map(bool, hits)) / len(hits) for hits in hits_by_class.values() if len(hits)]
    if not rates:
        raise ValueError("no pointing-game trials")
    return sum(rates) / len(rates)


def energy_pointing_game(saliency: Tensor, mask: Tensor) -> float:
    """Share of the map's energy inside the mask (0 for an all-zero map)."""
    _check_pair(saliency, mask)
    total = saliency.sum()
    return float(saliency[mask].sum() / total) if total > 0 else 0.0


def instance_coverage(saliency: Tensor, masks: Sequence[Tensor], threshold: float = 0.5) -> list[float]:
    """Per instance: fraction of its pixels where the min-max normalized map is >= threshold."""
    low, high = saliency.min(), saliency.max()
    normalized = (saliency - low) / (high - low) if high > low else torch.zeros_like(saliency)
    out = []
    for mask in masks:
        _check_pair(saliency, mask)
        out.append(float((normalized[mask] >= threshold).float().mean()) if mask.any() else 0.0)
    return out


def _class_scores(score_fn: ScoreFn, inputs: Tensor, classes: Tensor) -> Tensor:
    with torch.inference_mode():
        return score_fn(inputs).gather(1, classes.view(-1, 1).to(inputs.device)).squeeze(1).float()


def average_drop_increase(
    score_fn: ScoreFn,
    inputs: Tensor,
    saliency: Tensor,
    classes: Tensor,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[float, float]:
    """Average Drop % = mean(max(0, Y - O) / Y) * 100; Increase % = mean(1[Y < O]) * 100.

    Y: class score on the input; O: on the input whose pixels (inputs * std + mean) are multiplied by the map
    (in [0, 1], [B, H, W]) and normalized again. The default mean 0, std 1 multiplies the tensor as it is.
    """
    if inputs.dim() != 4 or saliency.shape != (inputs.shape[0], *inputs.shape[2:]):
        raise ValueError(f"saliency {tuple(saliency.shape)} must be [B, H, W] matching inputs {tuple(inputs.shape)}")
    y = _class_scores(score_fn, inputs, classes)
    o = _class_scores(score_fn, masked(inputs, saliency, mean, std), classes)
    drop, increase = drop_increase(y, o)
    return float(drop.mean() * 100), float(increase.mean() * 100)


def _curve(
    score_fn: ScoreFn,
    start: Tensor,
    finish: Tensor,
    saliency: Tensor,
    classes: Tensor,
    pixels_per_step: int,
    batch_size: int,
) -> Tensor:
    """Scores while pixels move from `start` to `finish` in saliency order: [B, steps + 1]."""
    if start.dim() != 4 or saliency.shape != (start.shape[0], *start.shape[2:]):
        raise ValueError(f"saliency {tuple(saliency.shape)} must be [B, H, W] matching inputs {tuple(start.shape)}")
    batch, _channels, height, width = start.shape
    pixels = height * width
    steps = math.ceil(pixels / pixels_per_step)
    ranks = pixel_ranks(saliency).to(start.device)
    curves = torch.empty(batch, steps + 1)
    for b in range(batch):
        for first in range(0, steps + 1, batch_size):
            counts = torch.arange(first, min(steps + 1, first + batch_size), device=start.device) * pixels_per_step
            images = perturb(start[b], finish[b], ranks[b], counts)
            scores = _class_scores(score_fn, images, classes[b].repeat(len(counts)))
            curves[b, first : first + len(counts)] = scores.cpu()
    return curves


def deletion_curve(
    score_fn: ScoreFn,
    inputs: Tensor,
    saliency: Tensor,
    classes: Tensor,
    pixels_per_step: int = 224,
    batch_size: int = 64,
) -> Tensor:
    """Most salient pixels replaced by 0 (in the normalized tensor) first; step 0 is the intact input."""
    return _curve(score_fn, inputs, torch.zeros_like(inputs), saliency, classes, pixels_per_step, batch_size)


def insertion_curve(
    score_fn: ScoreFn,
    inputs: Tensor,
    saliency: Tensor,
    classes: Tensor,
    pixels_per_step: int = 224,
    batch_size: int = 64,
) -> Tensor:
    """From a blurred copy (Gaussian, kernel 11, sigma 5), most salient pixels restored first."""
    return _curve(score_fn, blurred(inputs), inputs, saliency, classes, pixels_per_step, batch_size)


def deletion_insertion_auc(
    score_fn: ScoreFn,
    inputs: Tensor,
    saliency: Tensor,
    classes: Tensor,
    pixels_per_step: int = 224,
    batch_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Per image: (deletion AUC, insertion AUC); lower deletion and higher insertion are better."""
    deletion = deletion_curve(score_fn, inputs, saliency, classes, pixels_per_step, batch_size)
    insertion = insertion_curve(score_fn, inputs, saliency, classes, pixels_per_step, batch_size)
    return auc(deletion), auc(insertion)


def _ranks(values: Tensor) -> Tensor:
    """Average ranks (ties share the mean rank), 1-based."""
    flat = values.flatten().double()
    order = torch.argsort(flat, stable=True)
    sorted_values = flat[order]
    ranks = torch.empty_like(flat)
    ranks[order] = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
    unique, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks[order])
    ranks[order] = (sums / counts)[inverse]
    return ranks


def spearman_rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman's rho of two maps (flattened), with average ranks for ties."""
    if a.numel() != b.numel():
        raise ValueError(f"maps have {a.numel()} and {b.numel()} values")
    ra, rb = _ranks(a) - (a.numel() + 1) / 2, _ranks(b) - (b.numel() + 1) / 2
    denominator = torch.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else 0.0
