"""Method families behind one interface: how one layer's map is formed, and what it costs in extra forwards.

- gradient methods (`methods.py`) weight activations by their gradient, `weights(A, g)`;
- activation methods (`activation.py`) need the activations only (Eigen-CAM);
- perturbation methods (`perturbation.py`) score extra forwards the engine runs for them through `Reruns`
  (Score-CAM: masked inputs through the whole model; Ablation-CAM: ablated activations through the rest of it).

The engine calls `Method.layer_map` once per target layer and never asks which family a method belongs to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

from torch import Tensor

from camserve.cam.errors import CamError
from camserve.cam.layouts import FeatureLayout
from camserve.cam.pairs import PairPlan

Family = Literal["gradient", "activation", "perturbation"]


@dataclass(frozen=True)
class LayerInput:
    """What one engine call knows about one target layer.

    `activation` is the layer's output per image in its own layout, detached; `gradient` the gradient of each
    pair's score with respect to it (gradient methods only, else None), one row per (image, class) pair;
    `images` the preprocessed batch; `logits` float32 [B, classes] of the same forward; `calls` how often the
    layer runs per forward (the last call is the one explained).
    """

    name: str
    layout: FeatureLayout
    calls: int
    activation: Tensor
    gradient: Tensor | None
    images: Tensor
    plan: PairPlan
    logits: Tensor

    def features(self) -> Tensor:
        """The activation as float32 [B, K, h, w], one row per image."""
        return self.layout.to_nchw(self.activation.float(), self.name)


def input_layer(images: Tensor, plan: PairPlan, logits: Tensor) -> LayerInput:
    """The input images as the "layer" of a method that reads none (`Method.reads_layer` False)."""
    grid = (int(images.shape[-2]), int(images.shape[-1]))
    return LayerInput("input", FeatureLayout("nchw", grid), 1, images, None, images, plan, logits)


class Suffix(Protocol):
    """The network after one layer, for one image: rows that replace the layer's output -> logits [m, classes]."""

    #: Rows per call that keep memory bounded.
    batch_size: int

    def __call__(self, image: int, rows: Tensor) -> Tensor: ...


class Reruns(Protocol):
    """Extra forwards the engine runs for perturbation methods: no autograd, in chunks, float32 logits."""

    #: Inputs per full forward.
    batch_size: int

    def logits(self, inputs: Tensor) -> Tensor:
        """Logits [m, classes] of a full forward of `inputs` (at most `batch_size` of them)."""
        ...

    def suffix(self, layer: LayerInput) -> Suffix:
        """The part of the network after `layer`, for ablated copies of its output."""
        ...

    def probability(self, logits: Tensor) -> Tensor:
        """The model's probabilities for `logits` [m, classes] (its head: softmax or sigmoid)."""
        ...


class Method:
    """A CAM method: `layer_map` gives one layer's maps, [N, h, w] after ReLU, one row per (image, class) pair."""

    name: ClassVar[str]
    family: ClassVar[Family]
    #: Whether the engine must back-propagate each pair's score to the target layer first.
    needs_gradient: ClassVar[bool] = False
    #: Whether the method also needs the gradient with respect to the input image (guided backpropagation).
    needs_input_gradient: ClassVar[bool] = False
    #: Whether `counterfactual` (the negated gradient: what lowers the score) means anything for the method.
    counterfactual: ClassVar[bool] = False
    #: Whether the method reads a layer; one that does not (RISE) sees the input as its layer and needs only
    #: whole-model forwards, so it explains any model that gives logits.
    reads_layer: ClassVar[bool] = True
    #: Whether its extra forwards run only the network after the layer (Ablation-CAM, ReciproCAM), so each costs a
    #: fraction of a forward (`costs.suffix_fraction`).
    reruns_after_layer: ClassVar[bool] = False
    #: What `extra_forwards` counts per image and layer ("channels" or "cells"), for messages.
    cost_unit: ClassVar[str] = "channels"

    def check(self, *, counterfactual: bool, layers: bool = False) -> None:
        """Raise CamError for option combinations the method does not define (`layers`: layers were named)."""
        if layers and not self.reads_layer:
            raise CamError(f"{self.name} reads no layer (it perturbs the input itself); ask without layer")
        if counterfactual and not self.counterfactual:
            raise CamError(
                f"counterfactual maps negate the gradient, and {self.name} uses none ({self.family} method); "
                "ask without counterfactual, or with a gradient method (gradcam, gradcampp, ...)"
            )

    def extra_forwards(self, images: int, channels: Sequence[int], cells: Sequence[int] = ()) -> int:
        """Forwards beyond the request's own, for `images` images at layers of `channels` channels and `cells`
        grid cells (h * w, in the same order; needed only by methods whose cost is per cell)."""
        return 0

    def layer_map(self, layer: LayerInput, reruns: Reruns) -> Tensor:
        """This layer's map for every pair of `layer.plan`, [N, h, w], after ReLU."""
        raise NotImplementedError
