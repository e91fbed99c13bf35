"""The CAM engine for an ONNX model: the methods that need no gradient, with graph tensors as layers.

ONNX Runtime has no autograd, so gradient methods are refused, naming the methods that work: Eigen-CAM reads the
tensor; Score-CAM and RISE run whole-graph forwards; Ablation-CAM and ReciproCAM run the graph cut after the
tensor (`onnx_graph.OnnxCut`). The default layer is found without gradients: the deepest feature map or token
normalization whose grid, zeroed, changes the logits of two noise images (in a ViT whose head reads the class
token only, that walks back to the last block's input norm, as the gradient search does for PyTorch models).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from camserve.cam.costs import suffix_fraction
from camserve.cam.errors import MethodUnavailableError, UnknownLayerError
from camserve.cam.explanation import Explanation, checked_method, explain_input, fuse
from camserve.cam.family import LayerInput, Method
from camserve.cam.fastpath import noise
from camserve.cam.heads import Head, probabilities
from camserve.cam.layers import DEFAULT_PROBE_LAYERS, LayerTrace
from camserve.cam.methods import METHOD_NAMES, get_method
from camserve.cam.onnx_graph import OnnxCut, OnnxGraph
from camserve.cam.pairs import TargetSpec, choose_pairs
from camserve.cam.pauses import pause
from camserve.cam.reruns import CACHED_SPLITS, suffix_rows
from camserve.cam.split import SplitError

log = logging.getLogger(__name__)


class OnnxEngine:
    """`CamEngine`'s interface over an ONNX graph. Thread-safe."""

    def __init__(
        self, graph: OnnxGraph, *, default_layer: str | None = None, rerun_batch_size: int = 32, head: Head = "softmax"
    ) -> None:
        self.graph = graph
        self.device = torch.device("cpu")
        self.head: Head = head
        self.runtime = None
        self._default_layer = default_layer
        self._trace: LayerTrace | None = None
        self._lock = threading.Lock()
        self._reruns = OnnxReruns(self, rerun_batch_size)

    # -- what it runs ----------------------------------------------------------------------------
    @property
    def methods(self) -> tuple[str, ...]:
        """The methods that need no gradient, in display order."""
        return tuple(name for name in METHOD_NAMES if not _needs_gradient(get_method(name)))

    def check_method(self, cam: Method) -> None:
        """MethodUnavailableError, naming the methods that work, for a method that needs gradients."""
        if _needs_gradient(cam):
            raise MethodUnavailableError(
                f"an ONNX model has no autograd, so {cam.name} (a gradient method) cannot explain it; it explains "
                f"with: {', '.join(self.methods)}"
            )

    def suffix_fraction(self, example: Tensor) -> float:
        """What one row through the graph after the default layer costs, as a fraction of one image's forward."""
        images = example[:1].float().cpu()
        name = self.default_layer
        logits, activation = self.graph.run(images, (name,))
        logits = logits.float()
        layer = LayerInput(
            name, self.trace().layouts[name], 1, activation, None, images, choose_pairs(None, logits), logits
        )
        return suffix_fraction(layer, self._reruns)

    def use_head(self, head: Head) -> None:
        self.head = head

    # -- structure -------------------------------------------------------------------------------
    def trace(self, example: Tensor | None = None) -> LayerTrace:
        """The graph's tensors, their shapes and layouts, and the default layer, found once from `example`'s size."""
        with self._lock:
            if self._trace is None:
                if example is None:
                    raise RuntimeError("pass an example input to trace() first")
                probe = noise(example, 2)
                trace = self.graph.trace(probe)
                self._trace = LayerTrace(
                    calls=trace.calls,
                    shapes=trace.shapes,
                    layouts=trace.layouts,
                    input_size=trace.input_size,
                    default=self._informative_layer(trace, probe),
                    modules=trace.modules,
                )
            return self._trace

    @property
    def default_layer(self) -> str:
        return self._default_layer or self.trace().default_layer

    def resolve_layers(self, layers: Sequence[str] | str | None, example: Tensor | None = None) -> tuple[str, ...]:
        """Tensor names (the default when none), checked, without duplicates."""
        trace = self.trace(example)
        names = [layers] if isinstance(layers, str) else list(layers or [])
        names = [n for n in names if n] or [self.default_layer]
        for name in names:
            self.graph.check_layer(name, trace)
            trace.layout(name)
        return tuple(dict.fromkeys(names))

    def _informative_layer(self, trace: LayerTrace, probe: Tensor) -> str | None:
        """The deepest candidate whose grid, zeroed, changes the logits (module docstring)."""
        candidates = [
            n for n in trace.spatial if trace.layouts[n].kind != "tokens" or "norm" in trace.modules[n].lower()
        ][-DEFAULT_PROBE_LAYERS:]
        for name in reversed(candidates):
            try:
                cut = self.graph.cut(name, probe)
            except SplitError:
                continue
            logits, activation, *carried = self.graph.run(probe, (name, *cut.carried))
            layout = trace.layouts[name]
            zeroed = activation.clone()
            layout.to_nchw(zeroed, name).zero_()  # a view: the grid's cells (prefix tokens kept)
            changed = torch.cat([cut.suffix(zeroed[i : i + 1], i, carried) for i in range(probe.shape[0])])
            if not torch.allclose(changed, logits.float(), rtol=1e-4, atol=1e-5):
                return name
        return None

    # -- inference -------------------------------------------------------------------------------
    @property
    def threads(self) -> int:
        """torch's intra-op threads: the count the graph's sessions were made with."""
        return self.graph.threads

    def torch_threads(self, layers: Sequence[str] | None = None, method: str | None = None) -> int:
        """Intra-op threads for torch's part of a batch while other work wants the cores: unchanged."""
        return self.threads

    def predict(self, images: Tensor) -> Tensor:
        """float32 logits [B, classes]."""
        return self.graph.logits(images)

    def explain(
        self,
        images: Tensor,
        targets: TargetSpec = None,
        *,
        method: str | Method = "eigencam",
        layers: Sequence[str] | str | None = None,
        counterfactual: bool = False,
        above: float | None = None,
        most: int = 20,
    ) -> Explanation:
        """As `CamEngine.explain`, for the methods in `methods`."""
        cam = checked_method(method, images, counterfactual=counterfactual, layers=bool(layers), runs=self.check_method)
        images = images.float().cpu()
        if not cam.reads_layer:
            return explain_input(cam, images, self.predict(images), self._reruns, targets, self.head, above, most)
        names = self.resolve_layers(layers, images)
        trace = self.trace()
        logits, *activations = self.graph.run(images, names)
        logits = logits.float()
        plan = choose_pairs(targets, logits, self.head, above, most)
        layer_maps = {}
        with torch.no_grad():
            for name, activation in zip(names, activations, strict=True):
                layer = LayerInput(name, trace.layouts[name], 1, activation, None, images, plan, logits)
                layer_maps[name] = cam.layer_map(layer, self._reruns)
        maps = fuse(layer_maps) if len(names) > 1 else layer_maps[names[0]]
        return Explanation.of(cam, names, logits, plan, maps, layer_maps=layer_maps)

    def cut(self, layer: str, probe: Tensor) -> OnnxCut:
        """The graph after `layer` (cached per layer, at most `CACHED_SPLITS`); SplitError when it cannot be cut."""
        return self._reruns.cut(layer, probe)


class OnnxReruns:
    """`family.Reruns` for an ONNX engine: whole-graph forwards, and the graph cut after a tensor."""

    def __init__(self, engine: OnnxEngine, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.engine = engine
        self.batch_size = batch_size
        self._cuts: OrderedDict[str, OnnxCut | SplitError] = OrderedDict()
        self._lock = threading.Lock()

    def logits(self, inputs: Tensor) -> Tensor:
        pause()  # each chunk: other work may run first
        return self.engine.graph.logits(inputs)

    def probability(self, logits: Tensor) -> Tensor:
        return probabilities(logits, self.engine.head)

    def cut(self, layer: str, probe: Tensor) -> OnnxCut:
        with self._lock:
            if layer not in self._cuts:
                try:
                    self._cuts[layer] = self.engine.graph.cut(layer, probe[:1])
                except SplitError as exc:
                    log.warning("tensor %s: no cut (%s)", layer, exc)
                    self._cuts[layer] = exc
                while len(self._cuts) > CACHED_SPLITS:
                    self._cuts.popitem(last=False)
            self._cuts.move_to_end(layer)
            found = self._cuts[layer]
        if isinstance(found, SplitError):
            raise UnknownLayerError(
                f"the ONNX graph cannot be cut after tensor {layer!r} ({found}), which this method needs; "
                "choose another layer, or use eigencam, scorecam or rise"
            )
        return found

    def suffix(self, layer: LayerInput) -> OnnxSuffix:
        rows = suffix_rows(layer.activation, self.batch_size)
        return OnnxSuffix(self.cut(layer.name, layer.images), layer.images, rows)


class OnnxSuffix:
    """`family.Suffix` over an `OnnxCut`: rows of one image in place of the tensor -> logits."""

    def __init__(self, cut: OnnxCut, images: Tensor, rows: int) -> None:
        self.cut = cut
        self.batch_size = rows
        self._carried = cut.prefix(images) if cut.needs_prefix() else ()

    def __call__(self, image: int, rows: Tensor) -> Tensor:
        pause()  # each chunk of rows: other work may run first
        return self.cut.suffix(rows, image, self._carried)


def _needs_gradient(cam: Method) -> bool:
    return cam.needs_gradient or cam.needs_input_gradient
