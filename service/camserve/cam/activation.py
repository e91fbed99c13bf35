"""Activation methods: maps from the activations alone, no gradient and no extra forward.

Eigen-CAM (Muhammad & Yeasin 2020) projects the activations on their first principal component. It has no
class dependence: every target of an image gets the same map.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from camserve.cam.family import Family, LayerInput, Method, Reruns


def principal_projection(features: Tensor) -> Tensor:
    """[B, K, h, w] -> [B, h, w]: each image's activations as an (h*w) x K matrix, each channel's mean over the
    positions removed, projected on the matrix's first right singular vector v (one batched SVD on the device).

    The SVD's sign is arbitrary; the convention here is that v's loadings sum to a positive number (the largest
    loading decides when they sum to 0 within rounding, 1e-4 of their absolute sum: layer-normalized tokens sum
    to 0 over channels, so there the sum is rounding noise that differs between runtimes). Since the projection
    p = X v gives p . (X 1) = s1^2 (v . 1), that is the sign under which the map correlates positively with the
    channel-summed activation.
    """
    batch, _, height, width = features.shape
    matrix = features.float().flatten(2).transpose(1, 2)  # [B, hw, K]
    centered = matrix - matrix.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    first = vh[:, 0]  # [B, K]
    total = first.sum(dim=1, keepdim=True)
    largest = first.gather(1, first.abs().argmax(dim=1, keepdim=True))
    rounding = total.abs() <= 1e-4 * first.abs().sum(dim=1, keepdim=True)
    sign = torch.where(rounding, largest.sign(), total.sign())
    return (centered @ (first * sign).unsqueeze(-1)).reshape(batch, height, width)


class EigenCAM(Method):
    """ReLU of the projection on the first principal component (see `principal_projection`), per image."""

    name = "eigencam"
    family: ClassVar[Family] = "activation"

    def layer_map(self, layer: LayerInput, reruns: Reruns) -> Tensor:
        return torch.relu(principal_projection(layer.features()))[layer.plan.image_index]
