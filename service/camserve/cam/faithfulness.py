"""How faithful one explanation is to the model (pure torch, no HTTP), as the project's reference notes define it.

- Average Drop / Increase in Confidence (Chattopadhyay et al. 2018): the map, upsampled to the model's input and
  min-max normalized to m in [0, 1], multiplies the image's pixels p in [0, 1] before normalization, so the model
  sees ((p * m) - mean) / std. With Y the softmax probability of the explained class on the image and O on the
  masked image: drop = max(0, Y - O) / Y, increase = 1 if Y < O else 0.
- Deletion / insertion (Petsiuk et al., RISE 2018): pixels ranked by the map, most salient first (ties in
  row-major order); step k of `steps` moves the floor(k * H * W / steps) first pixels. Deletion sets them to 0 in
  the normalized tensor, insertion restores them into a blurred copy (Gaussian, kernel 11, sigma 5). Each curve
  holds the class probability at k = 0..steps; its AUC is the trapezoid over the fractions k / steps in [0, 1].

`evaluate` scores a batch of explanations with 1 + 2 * steps forwards each (masked image, deletion steps
1..steps, insertion steps 0..steps-1): the curves' remaining end, the intact image, is Y, which the caller already
has from the explanation's own forward. `camserve.cam.metrics` averages the same quantities over data sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from camserve.cam.heads import Head
from camserve.cam.heads import probabilities as head_probabilities
from camserve.cam.pauses import pause
from camserve.cam.render import heatmaps

Predict = Callable[[Tensor], Tensor]  # normalized inputs [B, 3, H, W] -> logits [B, C]

BLUR_KERNEL = 11
BLUR_SIGMA = 5.0
DEFAULT_STEPS = 16


@dataclass(frozen=True)
class Faithfulness:
    """Per explanation (row): the four scores [N] and the two curves [N, steps + 1] they come from."""

    drop: Tensor
    increase: Tensor
    deletion_auc: Tensor
    insertion_auc: Tensor
    deletion: Tensor
    insertion: Tensor

    def table(self) -> Tensor:
        """[N, 4]: drop, increase, deletion AUC, insertion AUC."""
        return torch.stack([self.drop, self.increase, self.deletion_auc, self.insertion_auc], dim=1)


def forwards_per_explanation(steps: int) -> int:
    """Model forwards `evaluate` runs per explanation: the masked image and 2 * steps curve points."""
    return 1 + 2 * steps


def saliency(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Raw maps [N, h, w] -> [N, H, W] in [0, 1]: upsampled to the input, then min-max normalized (a constant map
    becomes all zeros)."""
    return heatmaps(maps.float(), size)


def _channels(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.tensor([float(v) for v in values], dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def masked(inputs: Tensor, saliency: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalized inputs [B, C, H, W] whose pixels (x * std + mean, in [0, 1]) are multiplied by `saliency`
    [B, H, W], normalized again. mean 0 and std 1 multiply the tensor as it is."""
    mean_t, std_t = _channels(mean, inputs), _channels(std, inputs)
    pixels = inputs * std_t + mean_t
    return (pixels * saliency.unsqueeze(1).to(inputs) - mean_t) / std_t


def blurred(inputs: Tensor) -> Tensor:
    """The insertion curve's start: a Gaussian blur (kernel 11, sigma 5) of normalized inputs [B, C, H, W]."""
    return gaussian_blur(inputs, kernel_size=[BLUR_KERNEL, BLUR_KERNEL], sigma=[BLUR_SIGMA, BLUR_SIGMA])


def pixel_ranks(saliency: Tensor) -> Tensor:
    """[N, H, W] -> each pixel's rank [N, H, W] (0 = most salient; ties keep row-major order)."""
    order = torch.sort(saliency.flatten(1), dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks.view_as(saliency)


def step_counts(pixels: int, steps: int) -> list[int]:
    """Pixels moved at steps 0..steps: floor(k * pixels / steps)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return [k * pixels // steps for k in range(steps + 1)]


def perturb(start: Tensor, finish: Tensor, rank: Tensor, counts: Tensor) -> Tensor:
    """[K, C, H, W]: `start` [C, H, W] (or [1, C, H, W]) with its `counts[k]` highest-ranked pixels taken from
    `finish` (same shape); `rank` [H, W] from `pixel_ranks`."""
    moved = rank.unsqueeze(0) < counts.view(-1, 1, 1).to(rank.device)
    return torch.where(moved.unsqueeze(1), finish.view(1, *finish.shape[-3:]), start.view(1, *start.shape[-3:]))


def drop_increase(y: Tensor, o: Tensor) -> tuple[Tensor, Tensor]:
    """Per explanation: drop = max(0, Y - O) / Y and increase = 1[Y < O] (Y, O: class probabilities)."""
    return torch.clamp(y - o, min=0) / y, (y < o).to(y.dtype)


def auc(curve: Tensor) -> Tensor:
    """Trapezoidal area under [..., n + 1] curves with x evenly spaced on [0, 1]."""
    steps = curve.shape[-1] - 1
    return (curve[..., :-1] + curve[..., 1:]).sum(-1) / 2 / steps


def evaluate(
    predict: Predict,
    inputs: Tensor,
    maps: Tensor,
    image_index: Sequence[int],
    classes: Sequence[int],
    y: Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    steps: int = DEFAULT_STEPS,
    chunk: int = 16,
    head: Head = "softmax",
) -> Faithfulness:
    """Faithfulness of N explanations: row n explains class `classes[n]` of image `image_index[n]` of the
    normalized `inputs` [B, C, H, W] with the raw map `maps[n]`; `y` [N] is that class's probability (under the
    model's `head`) on the intact image. The perturbed images go through `predict` at most `chunk` at a time, in
    row order; results float32 on the inputs' device."""
    rows = maps.shape[0]
    if not (len(image_index) == len(classes) == y.shape[0] == rows):
        raise ValueError(f"{rows} maps, {len(image_index)} images, {len(classes)} classes and {y.shape[0]} scores")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    height, width = inputs.shape[-2:]
    heat = saliency(maps.to(inputs.device), (height, width))
    ranks = pixel_ranks(heat)
    counts = torch.tensor(step_counts(height * width, steps), device=inputs.device)
    blur = blurred(inputs)
    zero = torch.zeros_like(inputs[0])
    columns = forwards_per_explanation(steps)  # masked, deletion 1..steps, insertion 0..steps-1

    def image(row: int, column: int) -> Tensor:
        i = image_index[row]
        if column == 0:
            return masked(inputs[i : i + 1], heat[row : row + 1], mean, std)[0]
        if column <= steps:
            return perturb(inputs[i], zero, ranks[row], counts[column : column + 1])[0]
        k = column - steps - 1
        return perturb(blur[i], inputs[i], ranks[row], counts[k : k + 1])[0]

    scores = torch.empty(rows * columns, dtype=torch.float32, device=inputs.device)
    for first, jobs in _chunks(rows * columns, chunk):
        pause()  # each chunk of perturbed inputs: other work may run first
        batch = torch.stack([image(*divmod(job, columns)) for job in jobs])
        target = torch.tensor([classes[job // columns] for job in jobs], device=inputs.device)
        probabilities = head_probabilities(predict(batch), head)
        scores[first : first + len(jobs)] = probabilities.gather(1, target.view(-1, 1).to(probabilities.device))[:, 0]
    scores = scores.view(rows, columns)
    y = y.float().to(scores.device).view(rows, 1)
    deletion = torch.cat([y, scores[:, 1 : steps + 1]], dim=1)
    insertion = torch.cat([scores[:, steps + 1 :], y], dim=1)
    drop, increase = drop_increase(y[:, 0], scores[:, 0])
    return Faithfulness(drop, increase, auc(deletion), auc(insertion), deletion, insertion)


def _chunks(total: int, size: int) -> Iterator[tuple[int, range]]:
    for first in range(0, total, size):
        yield first, range(first, min(total, first + size))
