"""ReciproCAM (Byun & Lee 2022, "Recipro-CAM: Fast gradient-free visual explanations for convolutional neural
networks", arXiv:2209.14074; in CVPR 2024 workshops as "ReciproCAM") and its token variant for ViTs (Byun & Lee 2023,
"ViT-ReciproCAM: Gradient and attention-free visual explanations for vision transformer", arXiv:2310.02588).

For the target layer's activation F of one image, on an h x w grid, one copy per cell (y, x) is the feature map
spatially masked around that cell, F^(y,x) = F * M^(y,x) (the same mask in every channel), and the network after
the layer turns each copy into the head's probabilities. The map of class c is

    S_c(y, x) = f_c(suffix(F * M^(y,x))),  f_c the model's probability (softmax, or sigmoid for its head),

at the layer's resolution, one value per cell: h x w rows through the suffix per image, whatever the number of
targets. The mask, by default the one OpenVINO XAI 1.1 uses for each kind of layer:

- `"cell"` (the default on feature maps): the one-hot mask, 1 at the cell and 0 elsewhere: what the paper's cited
  code (openvinotoolkit/datumaro, recipro_cam.py) calls by default and the only mask OpenVINO XAI's CNN ReciproCAM
  has.
- `"gaussian"` (the default on token layers): the 3 x 3 Gaussian kernel [[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16
  centred on the cell (1/4 at the cell, 1/8 at its edge neighbours, 1/16 at its corners, 0 elsewhere), cut at the
  grid's border and not renormalized there: the mask OpenVINO XAI 1.1 builds for ViTReciproCAM
  (`use_gaussian=True`, its default). Each cell keeps its own activation times its kernel weight. The authors'
  2022 CNN code (openvinotoolkit/training_extensions, misc/pytorch_toolkit/recipro_cam) has a Gaussian option that
  instead writes the centre cell's activation vector, scaled by the kernel, into the 3 x 3 neighbourhood; behind a
  global-average-pooling head that is the one-cell mask with the border cells scaled down (by 3/4, 9/16 at
  corners), so it is not followed here.

Token layers (ViTs): the mask applies to the patch tokens by their grid position; the prefix tokens (class,
distillation, registers) are kept as they are in every copy, as ViTReciproCAM does with `cls_token=True` (its
default). At a block's input norm (camserve's default ViT layer) only the norm's output is masked and the residual
stream around it is left whole: what OpenVINO XAI's torch ViTReciproCAM computes by hooking that norm (the third
LayerNorm from the end). Its OpenVINO-graph version masks the stream into the block as well, on both paths, which
one layer's output cannot express; explaining the previous block's output instead masks the stream on both paths,
with the norm recomputed from the masked tokens.

Normalization: the papers min-max normalize S_c to [0, 1] per map; camserve returns S_c itself (probabilities,
so the final ReLU changes nothing) and normalizes every map, of every method, the same way when it renders it
or fuses layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from camserve.cam.family import LayerInput, Reruns
from camserve.cam.layouts import FeatureLayout
from camserve.cam.perturbation import PerturbationMethod

Kernel = Literal["gaussian", "cell"]

#: The papers' 3 x 3 Gaussian kernel.
GAUSSIAN = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16


def cell_masks(grid: tuple[int, int], cells: Tensor, kernel: Kernel = "gaussian") -> Tensor:
    """The masks [len(cells), h, w] (float32, on `cells`' device) of the cells numbered y * w + x in `cells`: the
    kernel centred on the cell and cut at the border (1 at the cell only for `"cell"`)."""
    height, width = grid
    one_hot = torch.zeros((len(cells), 1, height, width), device=cells.device)
    one_hot.view(len(cells), -1)[torch.arange(len(cells), device=cells.device), cells] = 1
    if kernel == "cell":
        return one_hot[:, 0]
    weights = GAUSSIAN.to(cells.device).view(1, 1, 3, 3)
    return F.conv2d(one_hot, weights, padding=1)[:, 0]  # a symmetric kernel: correlation is convolution


def layer_masks(layout: FeatureLayout, grid: tuple[int, int], cells: Tensor, kernel: Kernel = "gaussian") -> Tensor:
    """The masks of `cells` shaped to multiply one image's activation in the layer's own layout, one row per cell:
    [m, 1, h, w] (NCHW), [m, h, w, 1] (NHWC) or [m, prefix + h*w, 1] (tokens; the prefix tokens' mask is 1)."""
    masks = cell_masks(grid, cells, kernel)
    if layout.kind == "nchw":
        return masks[:, None]
    if layout.kind == "nhwc":
        return masks[..., None]
    prefix = torch.ones((len(cells), layout.prefix), device=cells.device)
    return torch.cat([prefix, masks.flatten(1)], dim=1)[..., None]


class ReciproCAM(PerturbationMethod):
    """ReciproCAM with the `kernel` mask (None: "cell" on feature maps, "gaussian" on tokens): h x w rows of each
    image through the network after the layer."""

    name: ClassVar[str] = "reciprocam"
    cost_unit: ClassVar[str] = "cells"
    reruns_after_layer: ClassVar[bool] = True

    def __init__(self, kernel: Kernel | None = None) -> None:
        if kernel not in (None, "gaussian", "cell"):
            raise ValueError(f"kernel must be 'gaussian' or 'cell', got {kernel!r}")
        self.kernel: Kernel | None = kernel

    def kernel_for(self, layout: FeatureLayout) -> Kernel:
        """The mask on a layer of `layout`: the one asked for, else OpenVINO XAI's default for that kind."""
        return self.kernel or ("gaussian" if layout.kind == "tokens" else "cell")

    def extra_forwards(self, images: int, channels: Sequence[int], cells: Sequence[int] = ()) -> int:
        """One per image and cell of each layer (`cells`: h * w per layer), counted as a forward as Ablation-CAM's
        rows through the same suffix are."""
        if len(cells) != len(channels):
            raise ValueError("ReciproCAM's cost is per cell: give the cells (h * w) of every layer")
        return images * sum(cells)

    def layer_map(self, layer: LayerInput, reruns: Reruns) -> Tensor:
        plan, activation, layout = layer.plan, layer.activation, layer.layout
        height, width = layout.to_nchw(activation[:1], layer.name).shape[-2:]  # checks a token layer's count
        suffix = reruns.suffix(layer)
        chunks = torch.arange(height * width, device=activation.device).split(suffix.batch_size)
        saliency = torch.empty((len(plan), height * width), device=activation.device)
        for image in sorted(set(plan.images)):
            rows = [n for n, i in enumerate(plan.images) if i == image]
            row_index = torch.tensor(rows, device=activation.device)
            classes = plan.class_index[row_index]
            for chunk in chunks:  # masks made per chunk: h*w of them at once would be (h*w)^2 values
                mask = layer_masks(layout, (height, width), chunk, self.kernel_for(layout)).to(activation.dtype)
                scores = reruns.probability(suffix(image, activation[image].unsqueeze(0) * mask))  # [m, classes]
                saliency[row_index[:, None], chunk[None, :]] = scores[:, classes].T.float()
        return torch.relu(saliency.view(len(plan), height, width))
