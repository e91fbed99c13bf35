"""Perturbation methods: channel weights from extra forwards, which the engine's `Reruns` runs in bounded chunks.

Both cost one extra forward per image and channel, whatever the number of targets: every target of an image
reads its scores from the same forwards.

- Score-CAM (Wang et al. 2020): channel k, upsampled to the input and min-max normalized to [0, 1], masks the
  model's input (the normalized tensor, so a masked-out pixel is the dataset mean); the weight of channel k for
  class c is softmax over k of f_c(X * H_k) - f_c(X_b), f_c the model's probability of class c (softmax, or
  sigmoid for a multi-label or binary head). The baseline
  term is the same for every k and cancels in the softmax, so no baseline forward is needed. A constant channel
  has no min-max normalization; its mask is 0 (as pytorch-grad-cam's is), so every such channel of every image
  shares one forward of the all-zero input.
- Ablation-CAM (Desai & Ramaswamy 2020): w_k = (y_c - y_c^k) / y_c, y_c the logit and y_c^k the logit with
  channel k of the layer set to 0 (in every position; in every token of a token layer, prefix tokens included);
  only the network after the layer re-runs. Where y_c is exactly 0 the difference is not divided.

The map is ReLU(sum_k w_k A_k) at the layer's resolution, as for the gradient methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from camserve.cam.family import Family, LayerInput, Method, Reruns


def weighted_map(weights: Tensor, features: Tensor) -> Tensor:
    """ReLU(sum_k w_k A_k): weights [N, K], features [N, K, h, w] -> [N, h, w]."""
    return torch.relu((weights[:, :, None, None] * features).sum(dim=1))


class PerturbationMethod(Method):
    """One extra forward per image and channel of each layer."""

    family: ClassVar[Family] = "perturbation"

    def extra_forwards(self, images: int, channels: Sequence[int], cells: Sequence[int] = ()) -> int:
        return images * sum(channels)


class ScoreCAM(PerturbationMethod):
    """Score-CAM as the paper defines it; `masks` and `score` are the two places implementations differ."""

    name = "scorecam"

    def masks(self, rows: Tensor, size: tuple[int, int]) -> Tensor:
        """Channels [m, h, w] -> masks [m, 1, H, W]: bilinear upsampling (half-pixel centres, as every resize in
        camserve), then min-max normalization to [0, 1] per channel (0 for a constant channel)."""
        up = F.interpolate(rows[:, None], size=size, mode="bilinear", align_corners=False)
        flat = up.flatten(1)
        low, high = flat.amin(dim=1), flat.amax(dim=1)
        spread = (high - low)[:, None, None, None]
        scaled = (up - low[:, None, None, None]) / torch.where(spread > 0, spread, 1.0)
        return torch.where(spread > 0, scaled, 0.0)

    def score(self, logits: Tensor, reruns: Reruns) -> Tensor:
        """f of a masked input, for every class: the model's probability (the paper's confidence)."""
        return reruns.probability(logits)

    def channel_scores(self, layer: LayerInput, features: Tensor, reruns: Reruns) -> Tensor:
        """f_c(X * H_k) for every pair and channel, [N, K]; constant channels share one all-zero forward."""
        plan, images = layer.plan, layer.images
        batch, channels = features.shape[:2]
        classes = sorted(set(plan.classes))
        columns = torch.tensor(classes, device=features.device)
        flat = features.flatten(0, 1)  # [B*K, h, w], image-major
        spread = flat.flatten(1)
        constant = spread.amax(dim=1) == spread.amin(dim=1)
        scores = torch.empty((batch * channels, len(classes)), device=features.device)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        for chunk in (~constant).nonzero().squeeze(1).split(reruns.batch_size):
            masked = images[chunk // channels] * self.masks(flat[chunk], size).to(images.dtype)
            scores[chunk] = self.score(reruns.logits(masked), reruns)[:, columns]
        if bool(constant.any()):
            baseline = self.score(reruns.logits(torch.zeros_like(images[:1])), reruns)[:, columns]
            scores[constant] = baseline
        column_of = {c: i for i, c in enumerate(classes)}
        pair_columns = torch.tensor([column_of[c] for c in plan.classes], device=features.device)
        per_image = scores.view(batch, channels, len(classes))
        return per_image[plan.image_index, :, pair_columns]

    def layer_map(self, layer: LayerInput, reruns: Reruns) -> Tensor:
        features = layer.features()
        weights = torch.softmax(self.channel_scores(layer, features, reruns), dim=1)
        return weighted_map(weights, features[layer.plan.image_index])


class AblationCAM(PerturbationMethod):
    """Ablation-CAM: each channel zeroed in turn, batched through the rest of the network (`Reruns.suffix`)."""

    name = "ablationcam"
    reruns_after_layer = True

    def ablated_scores(self, layer: LayerInput, reruns: Reruns) -> Tensor:
        """y_c^k for every pair and channel, [N, K]."""
        plan, activation = layer.plan, layer.activation
        channel_dim = layer.layout.channel_dim % activation.dim()
        channels = activation.shape[channel_dim]
        suffix = reruns.suffix(layer)
        scores = torch.empty((len(plan), channels), device=activation.device)
        for image in sorted(set(plan.images)):
            rows = [n for n, i in enumerate(plan.images) if i == image]
            row_index = torch.tensor(rows, device=activation.device)
            classes = plan.class_index[row_index]
            for chunk in torch.arange(channels, device=activation.device).split(suffix.batch_size):
                copies = activation[image].unsqueeze(0).repeat(len(chunk), *([1] * (activation.dim() - 1)))
                copies.movedim(channel_dim, 1)[torch.arange(len(chunk), device=chunk.device), chunk] = 0
                logits = suffix(image, copies)
                scores[row_index[:, None], chunk[None, :]] = logits[:, classes].T.float()
        return scores

    def layer_map(self, layer: LayerInput, reruns: Reruns) -> Tensor:
        plan = layer.plan
        original = layer.logits[plan.image_index, plan.class_index][:, None]  # y_c [N, 1]
        drop = original - self.ablated_scores(layer, reruns)
        weights = torch.where(original != 0, drop / torch.where(original != 0, original, 1.0), drop)
        return weighted_map(weights, layer.features()[plan.image_index])
