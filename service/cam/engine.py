"""The CAM engine: logits and class activation maps from one forward pass.

Usable on its own from a notebook::

    engine = CamEngine(model)
    result = engine.explain(batch, targets=[[281], [282, 285]], method="gradcampp")
    result.maps  # [N, h, w] on the model's device, one row per (image, target) pair
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.cam.capture import ActivationCapture, guided_backprop
from service.cam.errors import CamError, InvalidTargetError
from service.cam.layers import LayerTrace, choose_default_layer, resolve_layer, trace_layers
from service.cam.methods import CamMethod, get_method
from service.cam.render import minmax_normalize, resize_maps

#: Per image: None (top-1 prediction), one class index, or a list of class indices (may be empty).
TargetSpec = Sequence[int | Sequence[int] | None] | None


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

    @property
    def scores(self) -> Tensor:
        """The logit of each pair's target class."""
        return self.logits[self.image_index, self.class_index]


class CamEngine:
    """Explains a classifier's decisions. Thread-safe: callers may share one engine and model."""

    def __init__(
        self,
        model: nn.Module,
        *,
        autocast_dtype: torch.dtype | None = None,
        default_layer: str | None = None,
    ) -> None:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.model = model
        first = next(model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.autocast_dtype = autocast_dtype
        self._default_layer = default_layer
        self._trace: LayerTrace | None = None
        self._trace_lock = threading.Lock()

    # -- structure ---------------------------------------------------------------------------
    def trace(self, example: Tensor | None = None) -> LayerTrace:
        """Module calls, output shapes, feature layouts and the default layer, found once.

        The probe is two seeded-noise images of `example`'s size (two, so the batch dimension is told
        apart from the others); the default layer is the deepest one whose gradient reaches its grid.
        """
        if self._trace is None:
            with self._trace_lock:
                if self._trace is None:
                    if example is None:
                        raise RuntimeError("call explain() once or pass an example input to trace()")
                    generator = torch.Generator().manual_seed(0)
                    probe = torch.randn((2, *example.shape[1:]), generator=generator).to(self.device)
                    with self._autocast():
                        trace = trace_layers(self.model, probe)
                    default = choose_default_layer(self.model, trace, probe, self._autocast)
                    self._trace = dataclasses.replace(trace, default=default)
        return self._trace

    @property
    def default_layer(self) -> str:
        """The configured default layer, or the automatic one (requires a prior trace)."""
        return self._default_layer or self.trace().default_layer

    def resolve_layers(self, layers: Sequence[str] | str | None, example: Tensor | None = None) -> tuple[str, ...]:
        """Validate layer paths (default when none) and return them without duplicates."""
        trace = self.trace(example)
        if layers is None or (isinstance(layers, str) and not layers):
            names: Sequence[str] = [self._default_layer or trace.default_layer]
        else:
            names = [layers] if isinstance(layers, str) else list(layers)
            if not names:
                names = [self._default_layer or trace.default_layer]
        for name in names:
            resolve_layer(self.model, name, trace)
            trace.layout(name)
        return tuple(dict.fromkeys(names))

    # -- inference ---------------------------------------------------------------------------
    def _autocast(self) -> AbstractContextManager[object]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def predict(self, images: Tensor) -> Tensor:
        """Logits [B, C] (float32) of a plain inference forward."""
        with torch.inference_mode(), self._autocast():
            return self.model(images.to(self.device)).float()

    def explain(
        self,
        images: Tensor,
        targets: TargetSpec = None,
        *,
        method: str | CamMethod = "gradcampp",
        layers: Sequence[str] | str | None = None,
        counterfactual: bool = False,
    ) -> Explanation:
        """Logits and maps for `images` [B, 3, H, W] (already preprocessed).

        `targets` gives per image the classes to explain (default: each image's top-1 prediction).
        `counterfactual` uses -gradient: regions that lower the class score.
        """
        cam = method if isinstance(method, CamMethod) else get_method(method)
        images = images.to(self.device)
        if images.dim() != 4:
            raise InvalidTargetError(f"images must be a [B, C, H, W] batch, got shape {tuple(images.shape)}")
        names = self.resolve_layers(layers, images)
        trace = self.trace()
        modules = {name: resolve_layer(self.model, name) for name in names}

        with torch.inference_mode(False), torch.no_grad():
            with ActivationCapture(modules, trace.calls, trace.layouts) as capture, self._autocast():
                logits = self.model(images)
            capture.check_complete()
            activations = [capture.activations[name] for name in names]
            image_index, class_index, rounds = self._pairs(targets, logits.detach())
            sign = -1.0 if counterfactual else 1.0
            grads = self._gradients(logits, activations, image_index, class_index, rounds, sign)
            logits = logits.detach().float()
            del capture

            layer_maps = {}
            for name, act, grad in zip(names, activations, grads, strict=True):
                layout = trace.layouts[name]
                feature = layout.to_nchw(act.detach()[image_index].float(), name)
                layer_maps[name] = cam(feature, layout.to_nchw(grad, name))
            del activations, grads
            maps = self._fuse(layer_maps) if len(names) > 1 else layer_maps[names[0]]
            guided = None
            if cam.needs_input_gradient:
                guided = self._guided(images, image_index, class_index, rounds, sign, maps)
                maps = guided.abs().amax(dim=1)

        return Explanation(
            method=cam.name,
            layers=names,
            counterfactual=counterfactual,
            logits=logits,
            image_index=image_index,
            class_index=class_index,
            maps=maps,
            layer_maps=layer_maps,
            guided=guided,
        )

    # -- helpers -----------------------------------------------------------------------------
    def _pairs(self, targets: TargetSpec, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Flatten per-image targets into (image, class, round) rows; validate against the logits."""
        batch, num_classes = logits.shape
        if targets is None:
            per_image: list[list[int] | None] = [None] * batch
        else:
            if isinstance(targets, (int, str)) or not isinstance(targets, Sequence):
                raise InvalidTargetError("targets must be a sequence with one entry per image")
            if len(targets) != batch:
                raise InvalidTargetError(f"got {len(targets)} target entries for a batch of {batch} images")
            per_image = [self._as_list(t, i) for i, t in enumerate(targets)]
        top1 = logits.argmax(dim=1).tolist()
        images, classes, rounds = [], [], []
        for i, wanted in enumerate(per_image):
            chosen = [top1[i]] if wanted is None else wanted
            for r, c in enumerate(chosen):
                if not 0 <= c < num_classes:
                    raise InvalidTargetError(
                        f"class index {c} for image {i} is out of range: the model has {num_classes} classes"
                    )
                images.append(i)
                classes.append(c)
                rounds.append(r)

        def as_tensor(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=logits.device)

        return as_tensor(images), as_tensor(classes), as_tensor(rounds)

    @staticmethod
    def _as_list(target: int | Sequence[int] | None, image: int) -> list[int] | None:
        if target is None:
            return None
        items = [target] if isinstance(target, (int, Tensor)) else list(target)
        out = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, Tensor)):
                raise InvalidTargetError(f"target {item!r} for image {image} is not a class index")
            out.append(int(item))
        return out

    @staticmethod
    def _gradients(
        logits: Tensor,
        inputs: Sequence[Tensor],
        image_index: Tensor,
        class_index: Tensor,
        rounds: Tensor,
        sign: float,
    ) -> list[Tensor]:
        """d(sign * logit[image, class]) / d input for every pair, one backward per target round.

        Images of a batch are independent in eval mode, so one backward gives every image's
        gradient for the class it asks for in that round.
        """
        count = image_index.numel()
        out = [torch.empty((count, *t.shape[1:]), dtype=torch.float32, device=t.device) for t in inputs]
        num_rounds = int(rounds.max()) + 1 if count else 0
        for r in range(num_rounds):
            rows = (rounds == r).nonzero().squeeze(1)
            grad_output = torch.zeros_like(logits)
            grad_output[image_index[rows], class_index[rows]] = sign
            grads = torch.autograd.grad(logits, list(inputs), grad_outputs=grad_output, retain_graph=r < num_rounds - 1)
            for buffer, grad in zip(out, grads, strict=True):
                buffer[rows] = grad[image_index[rows]].float()
        return out

    @staticmethod
    def _fuse(layer_maps: dict[str, Tensor]) -> Tensor:
        """Average of per-layer min-max normalized maps, resized to the largest layer."""
        size = max((tuple(m.shape[-2:]) for m in layer_maps.values()), key=lambda s: s[0] * s[1])
        stacked = [resize_maps(minmax_normalize(m), size) for m in layer_maps.values()]
        return torch.stack(stacked).mean(dim=0)

    def _guided(
        self,
        images: Tensor,
        image_index: Tensor,
        class_index: Tensor,
        rounds: Tensor,
        sign: float,
        cam_maps: Tensor,
    ) -> Tensor:
        """Guided backpropagation times the normalized, upsampled Grad-CAM: [N, C, H, W]."""
        inputs = images.detach().clone().requires_grad_(True)
        with torch.enable_grad(), guided_backprop() as guided, self._autocast():
            logits = self.model(inputs)
        if guided.gated == 0:
            raise CamError(
                "guided-gradcam needs activation functions (ReLU, GELU, SiLU, ...) to guide, and this model "
                "runs none that can be intercepted; use gradcam or another method"
            )
        (gradient,) = self._gradients(logits, [inputs], image_index, class_index, rounds, sign)
        weights = F.interpolate(
            minmax_normalize(cam_maps).unsqueeze(1), size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        return gradient * weights
