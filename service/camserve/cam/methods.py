"""CAM methods by name; the gradient family, each saying only how a map is formed from activations A and gradients g.

Shapes: A and g are [N, K, h, w] (one row per (image, target) pair), float32, on the model's device.
`combine` returns the map before the final ReLU, shape [N, h, w]. The gradient-free families live in
`activation.py` (Eigen-CAM), `perturbation.py` (Score-CAM, Ablation-CAM), `recipro.py` (ReciproCAM) and `rise.py`
(RISE); `family.py` is their common interface.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from camserve.cam.activation import EigenCAM
from camserve.cam.errors import UnknownMethodError
from camserve.cam.family import Family, LayerInput, Method, Reruns
from camserve.cam.perturbation import AblationCAM, ScoreCAM
from camserve.cam.recipro import ReciproCAM
from camserve.cam.rise import RISE


class CamMethod(Method):
    """A gradient method: weights each channel by `weights(A, g)` and sums over channels."""

    family: ClassVar[Family] = "gradient"
    needs_gradient = True
    counterfactual = True

    def layer_map(self, layer: LayerInput, reruns: Reruns) -> Tensor:
        assert layer.gradient is not None, "the engine gives gradient methods their gradient"
        features = layer.layout.to_nchw(layer.activation[layer.plan.image_index].float(), layer.name)
        return self(features, layer.layout.to_nchw(layer.gradient, layer.name))

    def weights(self, activations: Tensor, grads: Tensor) -> Tensor:
        """Per-channel weights, shape [N, K, 1, 1]."""
        raise NotImplementedError

    def combine(self, activations: Tensor, grads: Tensor) -> Tensor:
        """The map before ReLU, shape [N, h, w]."""
        return (self.weights(activations, grads) * activations).sum(dim=1)

    def __call__(self, activations: Tensor, grads: Tensor) -> Tensor:
        """The class activation map after ReLU, shape [N, h, w]."""
        return torch.relu(self.combine(activations, grads))


class GradCAM(CamMethod):
    """Selvaraju et al. 2017: w_k = mean_ij g_ij."""

    name = "gradcam"

    def weights(self, activations: Tensor, grads: Tensor) -> Tensor:
        return grads.mean(dim=(2, 3), keepdim=True)


class GradCAMPlusPlus(CamMethod):
    """Chattopadhyay et al. 2018, eq. 19 with the logit gradient.

    alpha_ij = g^2 / (2 g^2 + (sum_ab A_ab) g^3) = 1 / (2 + (sum_ab A_ab) g) for g != 0, with
    alpha = 0 where g = 0 or the denominator is 0 (no additive epsilon); w_k = sum_ij alpha_ij ReLU(g_ij).
    """

    name = "gradcampp"

    def weights(self, activations: Tensor, grads: Tensor) -> Tensor:
        spatial_sum = activations.sum(dim=(2, 3), keepdim=True)
        denominator = 2.0 + spatial_sum * grads
        valid = (grads != 0) & (denominator != 0)
        alpha = torch.where(valid, 1.0 / torch.where(valid, denominator, 1.0), 0.0)
        return (alpha * torch.relu(grads)).sum(dim=(2, 3), keepdim=True)


class XGradCAM(CamMethod):
    """Fu et al. 2020: w_k = sum_ij (A_ij / sum_ab A_ab) g_ij; 0 for channels whose sum is 0."""

    name = "xgradcam"

    def weights(self, activations: Tensor, grads: Tensor) -> Tensor:
        spatial_sum = activations.sum(dim=(2, 3), keepdim=True)
        weighted = (activations * grads).sum(dim=(2, 3), keepdim=True)
        nonzero = spatial_sum != 0
        return torch.where(nonzero, weighted / torch.where(nonzero, spatial_sum, 1.0), 0.0)


class LayerCAM(CamMethod):
    """Jiang et al. 2021: element-wise ReLU(g) * A summed over channels."""

    name = "layercam"

    def combine(self, activations: Tensor, grads: Tensor) -> Tensor:
        return (torch.relu(grads) * activations).sum(dim=1)


class HiResCAM(CamMethod):
    """Draelos & Carin 2020: element-wise g * A summed over channels."""

    name = "hirescam"

    def combine(self, activations: Tensor, grads: Tensor) -> Tensor:
        return (grads * activations).sum(dim=1)


class GuidedGradCAM(GradCAM):
    """Grad-CAM map multiplied element-wise by guided backpropagation at input resolution."""

    name = "guided-gradcam"
    needs_input_gradient = True


_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        GradCAM(), GradCAMPlusPlus(), XGradCAM(), LayerCAM(), HiResCAM(), GuidedGradCAM(),
        ScoreCAM(), AblationCAM(), EigenCAM(), RISE(), ReciproCAM(),
    )
}  # fmt: skip
_ALIASES = {
    "gradcam++": "gradcampp", "grad-cam": "gradcam", "grad-cam++": "gradcampp",
    "score-cam": "scorecam", "ablation-cam": "ablationcam", "eigen-cam": "eigencam", "recipro-cam": "reciprocam",
}  # fmt: skip

#: Canonical method names, in display order.
METHOD_NAMES: tuple[str, ...] = tuple(_METHODS)


def get_method(name: str) -> Method:
    """Look a method up by name or alias (case-insensitive)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    try:
        return _METHODS[key]
    except KeyError:
        known = ", ".join(METHOD_NAMES)
        raise UnknownMethodError(f"unknown CAM method {name!r}; use one of: {known}") from None
