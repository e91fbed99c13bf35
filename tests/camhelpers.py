"""CAM helpers shared by the CAM tests: a tiny model with hand-checkable maps, pytorch-grad-cam as the reference,
and seeded random weights for models that ship none."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from camserve.cam.methods import GradCAMPlusPlus as OurGradCAMPlusPlus


# -- a tiny model: features = ReLU(x), then a bias-free linear head --------------------------------------------
def tiny_model(weight: torch.Tensor) -> nn.Module:
    """ReLU feature layer + bias-free linear head with the given weight [C, K, h, w]."""
    classes = weight.shape[0]
    model = nn.Sequential(
        OrderedDict(features=nn.ReLU(), flatten=nn.Flatten(), fc=nn.Linear(weight[0].numel(), classes, bias=False))
    )
    with torch.no_grad():
        model.fc.weight.copy_(weight.reshape(classes, -1))
    return model


# Activations A (K=2, 2x2), all positive so ReLU leaves them unchanged.
A = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.5, 0.0], [2.0, 1.5]]])  # channel sums 10 and 4
# Gradients for class 0 and class 1.
G = torch.tensor(
    [
        [[[0.1, -0.2], [0.3, 0.0]], [[-0.25, 0.5], [0.05, 0.2]]],
        [[[0.02, 0.04], [-0.1, 0.3]], [[0.6, -0.1], [0.0, 0.4]]],
    ]
)


# -- pytorch-grad-cam as the reference at feature resolution ---------------------------------------------------
REFERENCES = {
    "gradcam": GradCAM,
    "gradcampp": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "hirescam": HiResCAM,
}
TARGETS = [281, 967]  # tabby, espresso


class EpsGradCAMPlusPlus(OurGradCAMPlusPlus):
    """Test only: the paper's alpha with pytorch-grad-cam's additive eps = 1e-6 in the denominator."""

    def weights(self, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        spatial_sum = activations.sum(dim=(2, 3), keepdim=True)
        alpha = grads**2 / (2 * grads**2 + spatial_sum * grads**3 + 1e-6)
        alpha = torch.where(grads != 0, alpha, 0.0)
        return (alpha * torch.relu(grads)).sum(dim=(2, 3), keepdim=True)


def reference_maps(
    method: str,
    model: torch.nn.Module,
    layer: torch.nn.Module,
    x: torch.Tensor,
    targets: list[int] = TARGETS,
    reshape_transform=None,
) -> np.ndarray:
    """pytorch-grad-cam's maps at feature resolution (its min-max scaling, no resize)."""

    class AtFeatureResolution(REFERENCES[method]):
        def get_target_width_height(self, input_tensor):
            return None

    for parameter in model.parameters():
        parameter.requires_grad_(True)
    with AtFeatureResolution(model, [layer], reshape_transform=reshape_transform) as cam:
        return cam(x, targets=[ClassifierOutputTarget(t) for t in targets])


# -- seeded random weights and Hugging Face models as plain modules ---------------------------------------------
def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Eval mode, with every all-zero Linear weight (torchvision's ViT head) re-drawn from a seeded normal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and not module.weight.any():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
    return model.eval()


class Logits(nn.Module):
    """A Hugging Face classifier seen as a module that returns the logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits
