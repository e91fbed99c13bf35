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

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from camserve.cam import scaling
from camserve.cam.capture import ActivationCapture, guided_backprop
from camserve.cam.costs import suffix_fraction
from camserve.cam.errors import CamError, MethodUnavailableError
from camserve.cam.explanation import Explanation, checked_method, explain_input, fuse
from camserve.cam.family import LayerInput, Method
from camserve.cam.fastpath import CompiledSplit, noise
from camserve.cam.heads import Head
from camserve.cam.layers import LayerTrace, choose_default_layer, resolve_layer, trace_layers
from camserve.cam.methods import METHOD_NAMES, get_method
from camserve.cam.pairs import PairPlan, TargetSpec, choose_pairs
from camserve.cam.render import minmax_normalize
from camserve.cam.reruns import EngineReruns
from camserve.cam.runtime import Backend, OnnxRuntimeSplit, RuntimeTable
from camserve.cam.split import ModelSplit, SplitError, split_model


class CamEngine:
    """Explains a classifier's decisions. Thread-safe: callers may share one engine and model."""

    def __init__(
        self,
        model: nn.Module,
        *,
        autocast_dtype: torch.dtype | None = None,
        default_layer: str | None = None,
        gradient_scale: float | None = None,
        rerun_batch_size: int = 32,
        head: Head = "softmax",
    ) -> None:
        """`gradient_scale`: a power of two for the backward's gradient output (None: 2**12 in float16, else 1).
        `rerun_batch_size`: masked or ablated inputs per extra forward of Score-CAM and Ablation-CAM. `head`: what
        the logits mean (`camserve.cam.heads`): the probability Score-CAM and callers use."""
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.model = model
        first = next(model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.autocast_dtype = autocast_dtype
        self._default_layer = default_layer
        self.gradient_scale = None if gradient_scale is None else scaling.check_scale(gradient_scale)
        self._trace: LayerTrace | None = None
        self._trace_lock = threading.Lock()
        #: The backends serving predictions and the default layer's prefix, per batch size (None: eager).
        self.runtime: RuntimeTable | None = None
        #: torch's intra-op threads where torch runs the forwards (the count where the engine was made).
        self.threads = torch.get_num_threads()
        self.head: Head = head
        self._reruns = EngineReruns(model, self._autocast, rerun_batch_size, head)

    # -- structure ---------------------------------------------------------------------------
    @property
    def scripted(self) -> bool:
        """A TorchScript model: it takes no hooks, so only methods that read no layer explain it."""
        return isinstance(self.model, torch.jit.ScriptModule)

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods this engine runs (`check_method` passes), in display order."""
        return tuple(name for name in METHOD_NAMES if not self.scripted or not get_method(name).reads_layer)

    def check_method(self, cam: Method) -> None:
        """CamError, naming the methods that work, when this engine cannot run `cam`."""
        if cam.name not in self.methods:
            raise MethodUnavailableError(
                f"a TorchScript model takes no hooks, so {cam.name}, which reads a layer, cannot explain it; "
                f"it explains with: {', '.join(self.methods)}"
            )

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
        """Logits [B, C] (float32) of a plain inference forward (on the runtime serving this batch size)."""
        images = images.to(self.device)
        if self.runtime is not None:
            logits = self.runtime.attempt(images.shape[0], lambda backend: backend.logits(images).float())
            if logits is not None:
                return logits
        return self.predict_eager(images)

    def predict_eager(self, images: Tensor) -> Tensor:
        """Logits [B, C] (float32) of the eager model."""
        with torch.inference_mode(), self._autocast():
            return self.model(images.to(self.device)).float()

    def backend_for(self, batch: int) -> Backend | None:
        """The runtime serving batches of `batch` images (None: the eager model)."""
        return None if self.runtime is None else self.runtime.for_batch(batch)

    def torch_threads(self, layers: Sequence[str] | None = None, method: str | None = None) -> int:
        """Intra-op threads for torch's part of a batch predicted, or explained by `method` at `layers` (None or
        empty: the default layer, or none), while other work wants the cores: one where ONNX Runtime on the CPU
        serves every batch size and these layers and the method needs no eager pass of its own (Guided Grad-CAM
        runs the whole model backwards), since torch then only resizes, runs the suffix and its backward and
        weighs the maps, and a second thread of it waits at each op for a core that work holds (16 users
        explaining: 1.10x images/s; docs/benchmarks.md); else `threads`."""
        runtime = self.runtime
        if runtime is None or self.device.type != "cpu" or runtime.served() != {OnnxRuntimeSplit.name}:
            return self.threads
        if method is not None and get_method(method).needs_input_gradient:
            return self.threads
        return 1 if not layers or tuple(dict.fromkeys(layers)) == (runtime.layer,) else self.threads

    def split(self, example: Tensor) -> ModelSplit:
        """The model split at the default layer (its export made once per engine); SplitError when it cannot be."""
        return split_model(self._reruns.export(example.to(self.device)), self.default_layer)

    def adopt_export(self, graph: fx.GraphModule) -> None:
        """Split `graph` (the model's own exported graph, batch dimension dynamic) instead of exporting the model."""
        self._reruns.adopt_export(graph)

    def adopt_split(self, split: ModelSplit) -> None:
        """Use `split` (loaded from a cache) for Ablation-CAM's reruns at its layer instead of exporting."""
        self._reruns.adopt(split)

    def compile(
        self,
        example: Tensor,
        *,
        max_batch: int,
        channels_last: bool | None = None,
        split: ModelSplit | None = None,
    ) -> CompiledSplit:
        """The fast path at the default layer, compiled, warmed up and checked (its `report` says how it did); serve
        through it with `use_fast_path` or a `RuntimeTable`. Raises SplitError when the model does not export or
        split there.

        Warm-up covers batches up to `max_batch` and the rerun batch size, so that Score-CAM's masked forwards
        run compiled too.

        `channels_last` (default: models with convolutions past their first layer) feeds the prefix NHWC inputs.
        `split`: the split at the default layer when the caller has it (else exported here).
        """
        example = example.to(self.device)
        split = split or self.split(example)
        if channels_last is None:
            channels_last = sum(isinstance(m, nn.Conv2d) for m in self.model.modules()) > 2
        compiled = CompiledSplit(split, autocast=self._autocast, channels_last=channels_last)
        compiled.warm_up(example, max(max_batch, self._reruns.batch_size), self.predict_eager)
        self.check_backend(compiled, example)
        return compiled

    def check_backend(self, backend: Backend, example: Tensor) -> None:
        """Raise SplitError unless the backend's activation is the layer's output as the hooks see it (equal logits
        alone would not tell a cut in the wrong place)."""
        images = noise(example, 2)
        layer = backend.layer
        trace = self.trace()
        with torch.inference_mode(False), torch.no_grad():
            modules = {layer: resolve_layer(self.model, layer)}
            _, (reference,) = self._forward(images, (layer,), modules, trace, record=False, eager=True)
        activation, _ = backend.prefix(images)
        reference = reference.detach().float()
        if activation.shape != reference.shape:
            raise SplitError(
                f"the split at {layer!r} gives shape {tuple(activation.shape)}, the layer {tuple(reference.shape)}"
            )
        error = (activation.float().to(reference.device) - reference).abs().max().item()
        tolerance = (1e-3 if self.autocast_dtype is None else 5e-2) * max(1.0, reference.abs().max().item())
        if error > tolerance:
            raise SplitError(f"the split's activation at {layer!r} differs from the layer's output by {error:.3g}")

    def use_runtime(self, runtime: RuntimeTable | None) -> None:
        """Serve predictions, the default layer's maps and full-forward reruns as `runtime` says (None: eagerly)."""
        if runtime is not None and runtime.layer != self.default_layer:
            raise ValueError(f"the runtime splits at {runtime.layer!r}, not at the default layer {self.default_layer}")
        self.runtime = runtime
        self._reruns.runtime = runtime

    def suffix_fraction(self, example: Tensor) -> float:
        """What one row through the network after the default layer costs, as a fraction of one image's forward
        (`costs.suffix_fraction`, measured on `example`)."""
        images = example[:1].to(self.device)
        name, trace = self.default_layer, self.trace()
        with torch.inference_mode(False), torch.no_grad():
            modules = {name: resolve_layer(self.model, name)}
            logits, (activation,) = self._forward(images, (name,), modules, trace, record=False)
            logits = logits.detach().float()
            plan = choose_pairs(None, logits)
            layer = LayerInput(
                name, trace.layouts[name], trace.calls[name], activation.detach(), None, images, plan, logits
            )
            return suffix_fraction(layer, self._reruns)

    def use_head(self, head: Head) -> None:
        """Read the logits as `head` says (softmax, or sigmoid for multi-label and single-logit models)."""
        self.head = head
        self._reruns.head = head

    def use_fast_path(self, fast: Backend | None) -> None:
        """Serve every batch size through `fast` (None: eagerly)."""
        self.use_runtime(None if fast is None else RuntimeTable.single(fast))

    def explain(
        self,
        images: Tensor,
        targets: TargetSpec = None,
        *,
        method: str | Method = "gradcampp",
        layers: Sequence[str] | str | None = None,
        counterfactual: bool = False,
        above: float | None = None,
        most: int = 20,
    ) -> Explanation:
        """Logits and maps for `images` [B, 3, H, W] (already preprocessed).

        `targets` gives per image the classes to explain (default: each image's top-1 prediction; with `above`,
        every class whose probability under the head is at least `above`, most probable first, at least the top-1
        and at most `most`). `counterfactual` uses -gradient: regions that lower the class score.
        """
        cam = checked_method(method, images, counterfactual=counterfactual, layers=bool(layers), runs=self.check_method)
        images = images.to(self.device)
        if not cam.reads_layer:
            logits = self.predict(images).clone()
            return explain_input(cam, images, logits, self._reruns, targets, self.head, above, most)
        names = self.resolve_layers(layers, images)
        trace = self.trace()
        modules = {name: resolve_layer(self.model, name) for name in names}

        with torch.inference_mode(False), torch.no_grad():
            logits, activations = self._forward(images, names, modules, trace, record=cam.needs_gradient)
            plan = choose_pairs(targets, logits.detach(), self.head, above, most)
            sign = -1.0 if counterfactual else 1.0
            grads = self._gradients(logits, activations, plan, sign) if cam.needs_gradient else [None] * len(names)
            logits = logits.detach().float()

            layer_maps = {}
            for name, act, grad in zip(names, activations, grads, strict=True):
                calls, layout = trace.calls[name], trace.layouts[name]
                layer = LayerInput(name, layout, calls, act.detach(), grad, images, plan, logits)
                layer_maps[name] = cam.layer_map(layer, self._reruns)
            del activations, grads
            maps = fuse(layer_maps) if len(names) > 1 else layer_maps[names[0]]
            guided = None
            if cam.needs_input_gradient:
                guided = self._guided(images, plan, sign, maps)
                maps = guided.abs().amax(dim=1)

        return Explanation.of(
            cam, names, logits, plan, maps, counterfactual=counterfactual, layer_maps=layer_maps, guided=guided
        )

    # -- helpers -----------------------------------------------------------------------------
    def _forward(
        self,
        images: Tensor,
        names: tuple[str, ...],
        modules: dict[str, nn.Module],
        trace: LayerTrace,
        *,
        record: bool = True,
        eager: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """Logits, with autograd recorded from the layers' activations on (unless `record` is False), and those
        activations.

        At the runtime's layer (unless `eager`): the prefix on the backend serving this batch size, then the
        suffix in torch with autograd. Elsewhere: the eager model with hooks that switch autograd on at the first
        target layer.
        """
        if not eager and self.runtime is not None and names == (self.runtime.layer,):
            split = self.runtime.attempt(images.shape[0], lambda b: self._split_forward(b, images, trace, record))
            if split is not None:
                return split
        capture = ActivationCapture(modules, trace.calls, trace.layouts, record=record)
        with capture, self._autocast():
            logits = self.model(images)
        capture.check_complete()
        return logits, [capture.activations[name] for name in names]

    def _split_forward(
        self, backend: Backend, images: Tensor, trace: LayerTrace, record: bool
    ) -> tuple[Tensor, list[Tensor]]:
        """`_forward` at the runtime's layer: the prefix on `backend`, the suffix in torch."""
        activation, carried = backend.prefix(images)
        trace.layouts[backend.layer].check(activation.shape, backend.layer)
        activation = activation.to(self.device).detach().requires_grad_(record)
        with torch.set_grad_enabled(record):  # a clone: in-place operations of the suffix leave it intact
            logits = backend.suffix(activation.clone(), carried)
        return logits, [activation]

    def _gradient_scales(self, logits: Tensor) -> list[float]:
        """Scales to try for one backward: see service.cam.scaling (float16 only, unless configured)."""
        if self.gradient_scale is not None:
            return scaling.scales(self.gradient_scale)
        half = self.autocast_dtype == torch.float16 or logits.dtype == torch.float16
        return scaling.scales(scaling.default_scale(torch.float16 if half else None))

    def _gradients(self, logits: Tensor, inputs: Sequence[Tensor], plan: PairPlan, sign: float) -> list[Tensor]:
        """d(sign * logit[image, class]) / d input for every pair (float32), one backward per target round.

        Images of a batch are independent in eval mode, so one backward gives every image's gradient for
        the class it asks for in that round. Under float16 the backward runs on a scaled gradient output,
        retried at lower scales while the result is not finite, and is unscaled exactly in float32.
        """
        tries = self._gradient_scales(logits)
        for attempt, scale in enumerate(tries):
            last = attempt == len(tries) - 1
            out = self._backward(logits, inputs, plan, sign * scale, retain=not last)
            if scale == 1:
                return out
            if last or scaling.all_finite(out):
                return [buffer.mul_(1.0 / scale) for buffer in out]
        raise AssertionError("unreachable: the last scale always returns")

    @staticmethod
    def _backward(
        logits: Tensor, inputs: Sequence[Tensor], plan: PairPlan, fill: float, *, retain: bool
    ) -> list[Tensor]:
        """One backward per round with `fill` at each row's logit; gradients gathered into float32 buffers."""
        count = len(plan)
        out = [torch.empty((count, *t.shape[1:]), dtype=torch.float32, device=t.device) for t in inputs]
        for r, rnd in enumerate(plan.rounds):
            grad_output = torch.zeros_like(logits)
            grad_output[rnd.images, rnd.classes] = fill
            keep = retain or r < len(plan.rounds) - 1
            grads = torch.autograd.grad(logits, list(inputs), grad_outputs=grad_output, retain_graph=keep)
            for buffer, grad in zip(out, grads, strict=True):
                buffer[rnd.rows] = grad[rnd.images].float()
        return out

    def _guided(
        self,
        images: Tensor,
        plan: PairPlan,
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
        (gradient,) = self._gradients(logits, [inputs], plan, sign)
        weights = F.interpolate(
            minmax_normalize(cam_maps).unsqueeze(1), size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        return gradient * weights
