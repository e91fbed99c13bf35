"""An ONNX classifier run by ONNX Runtime: its logits, any tensor of its graph, and the graph after a tensor.

Layers of an ONNX model are tensor names of its graph. A tensor is read by running the graph with it added as an
output (one session per set of outputs, kept). The network after a tensor is cut out with onnx's own extractor:
its inputs are the tensor and whatever else the rest of the graph reads from before it ("carried": skip
connections, shapes computed from the batch), so reruns run only the rest. A carried value is one of

- "rows": a float tensor with one row per image (each image's row is repeated for its reruns);
- "linear": an integer tensor that depends on the batch size (a shape): its value for n rows is extrapolated
  from the values at batch sizes 1 and 2, as shape arithmetic is linear in the batch size;
- "fixed": the same for every batch.

Sessions run on ONNX Runtime's CPU provider, or CUDA/TensorRT where installed on a GPU host; tensors come back
as CPU torch tensors.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import Tensor

from camserve.cam.errors import UnknownLayerError
from camserve.cam.layers import LayerTrace
from camserve.cam.layouts import detect_layout
from camserve.cam.runtime import onnx_providers
from camserve.cam.split import SplitError

log = logging.getLogger(__name__)

#: Sessions kept per graph (each set of extra outputs is one session).
CACHED_SESSIONS = 16


class OnnxGraphError(ValueError):
    """The file is not an ONNX classifier camserve can serve (the message says why)."""


@dataclass(frozen=True)
class ImageInput:
    """The graph's image input: its name and NCHW shape (None where a dimension is dynamic)."""

    name: str
    batch: int | None
    channels: int
    size: tuple[int | None, int | None]


def _session_run(session: object, feeds: dict[str, object], names: Sequence[str]) -> list[Tensor]:
    arrays = {
        name: value.detach().float().cpu().contiguous().numpy()
        if isinstance(value, Tensor) and value.is_floating_point()
        else value.cpu().numpy()
        if isinstance(value, Tensor)
        else value
        for name, value in feeds.items()
    }
    outputs = session.run(list(names), arrays)  # type: ignore[attr-defined]
    return [torch.from_numpy(np.ascontiguousarray(v)) for v in outputs]


class OnnxGraph:
    """One ONNX classifier: sessions over its graph, with any of its tensors as extra outputs. Thread-safe."""

    def __init__(self, model: onnx.ModelProto, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        self.model = model
        self.providers = list(providers)
        self.threads = torch.get_num_threads()
        self.input = _image_input(model)
        if not model.graph.output:
            raise OnnxGraphError("the graph has no output")
        self.output = model.graph.output[0].name
        self._initializers = {t.name for t in model.graph.initializer}
        self._sessions: dict[tuple[str, ...], object] = {}
        self._lock = threading.Lock()
        self._dtypes: dict[str, int] = {}

    @classmethod
    def load(cls, path: Path) -> OnnxGraph:
        """The graph in `path` (OnnxGraphError when it cannot be read or is no image classifier)."""
        try:
            model = onnx.load(str(path))
            onnx.checker.check_model(model)
        except Exception as exc:
            raise OnnxGraphError(f"{path} is not a readable ONNX model ({exc})") from exc
        return cls(model)

    def place(self, device: torch.device) -> torch.device:
        """Run on `device`'s providers (CUDA or TensorRT on a GPU host where onnxruntime-gpu is installed, else
        the CPU's, logged) with torch's thread count; returns where its tensors are read."""
        self.threads = torch.get_num_threads()
        try:
            self.providers = onnx_providers(device)
        except SplitError as exc:
            log.warning("ONNX model on the CPU provider: %s", exc)
            self.providers = onnx_providers(torch.device("cpu"))
        self._sessions.clear()
        return torch.device("cpu")

    # -- running -------------------------------------------------------------------------------
    def logits(self, images: Tensor) -> Tensor:
        """float32 logits [B, classes] of `images` [B, C, H, W]."""
        (logits,) = self.run(images, ())
        return logits.float()

    def run(self, images: Tensor, tensors: Sequence[str]) -> list[Tensor]:
        """The logits, then each of `tensors`, for `images`."""
        names = (self.output, *tensors)
        return self._run(self._graph_session(tuple(tensors)), {self.input.name: images}, names, [self.input.name])

    def _graph_session(self, tensors: tuple[str, ...]) -> object:
        with self._lock:
            if tensors not in self._sessions:
                model = copy.deepcopy(self.model)
                for name in tensors:
                    model.graph.output.append(self._value_info(name))
                self._remember(tensors, self._session(model))
            return self._sessions[tensors]

    def _remember(self, key: tuple[str, ...], session: object) -> None:
        self._sessions[key] = session
        while len(self._sessions) > CACHED_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))

    def _session(self, model: onnx.ModelProto) -> object:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(model.SerializeToString(), options, providers=self.providers)

    def _run(
        self, session: object, feeds: dict[str, object], names: Sequence[str], batched: Sequence[str]
    ) -> list[Tensor]:
        """`names` for `feeds`; a graph with a fixed batch size runs the `batched` feeds in chunks of it (the last
        padded by repeating its last row), its batched outputs joined and the others taken from the first chunk."""
        if self.input.batch is None:
            return _session_run(session, feeds, names)
        size = self.input.batch
        count = next(int(feeds[name].shape[0]) for name in batched)  # type: ignore[attr-defined]
        chunks = []
        for start in range(0, count, size):
            chunk = dict(feeds)
            for name in batched:
                value = feeds[name][start : start + size]  # type: ignore[index]
                if value.shape[0] < size:
                    value = torch.cat([value, value[-1:].expand(size - value.shape[0], *value.shape[1:])])
                chunk[name] = value
            chunks.append(_session_run(session, chunk, names))
        first = chunks[0]
        joined = [
            torch.cat([c[i] for c in chunks])[:count] if v.dim() and v.shape[0] == size else v
            for i, v in enumerate(first)
        ]
        return joined

    def _value_info(self, name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, self._dtypes.get(name, TensorProto.FLOAT), None)

    # -- structure -----------------------------------------------------------------------------
    def trace(self, probe: Tensor) -> LayerTrace:
        """Every float tensor's shape on `probe` (at least 2 images) and the layouts of those that are feature
        maps or token grids, in graph order; `modules` holds the op that makes each tensor."""
        produced = [(node.op_type, out) for node in self.model.graph.node for out in node.output if out]
        self._dtypes = _dtypes(self.model)
        floats = [(op, name) for op, name in produced if self._dtypes.get(name) == TensorProto.FLOAT]
        every = tuple(name for _, name in floats)
        values = self.run(probe, every)[1:]
        with self._lock:
            self._sessions.pop(every, None)  # read once: its outputs need not stay wired
        shapes = {name: tuple(v.shape) for (_, name), v in zip(floats, values, strict=True)}
        batch, input_size = probe.shape[0], (int(probe.shape[-2]), int(probe.shape[-1]))
        grids = [
            found.grid
            for name, shape in shapes.items()
            if len(shape) == 4 and (found := detect_layout(shape, batch, input_size)) is not None
        ]
        layouts = {
            name: found
            for name, shape in shapes.items()
            if (found := detect_layout(shape, batch, input_size, grids)) is not None
        }
        return LayerTrace(
            calls=dict.fromkeys(shapes, 1),
            shapes=shapes,
            layouts=layouts,
            input_size=input_size,
            modules={name: op for op, name in floats},
        )

    def cut(self, layer: str, probe: Tensor) -> OnnxCut:
        """The graph after tensor `layer` (SplitError when it cannot be cut there); `probe` (one image) finds how
        each carried value depends on the batch."""
        graph = self.model.graph
        producer = {out: node for node in graph.node for out in node.output}
        dynamic = _dependents(graph, {self.input.name})
        after = _dependents(graph, {layer})
        suffix: set[int] = set()
        carried: list[str] = []
        stack, seen, reaches = [self.output], set(), False
        while stack:
            name = stack.pop()
            reaches = reaches or name == layer
            if name in seen or name == layer or name in self._initializers or not name:
                continue
            seen.add(name)
            node = producer.get(name)
            if node is None or (name in dynamic and name not in after):  # the image, or computed before the layer
                carried.append(name)
                continue
            suffix.add(id(node))
            stack.extend(node.input)
        if not reaches:
            raise SplitError(f"the output does not depend on tensor {layer!r}")
        order = {name: i for i, name in enumerate([self.input.name, *producer])}
        carried = sorted(set(carried), key=lambda name: order.get(name, -1))
        model = copy.deepcopy(self.model)
        known = {v.name for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
        one = probe[:1]
        values = self.run(one, (layer, *carried))[1:]
        twice = self.run(one.repeat(2, 1, 1, 1), (layer, *carried))[1:]
        for name, value in zip((layer, *carried), values, strict=True):
            if name not in known:
                model.graph.value_info.append(_value_info_of(name, value))
        try:
            extracted = onnx.utils.Extractor(model).extract_model([layer, *carried], [self.output])
            session = self._session(extracted)
        except Exception as exc:
            raise SplitError(f"the graph cannot be cut at {layer!r} ({exc})") from exc
        kinds = tuple(_kind(name, a, b) for name, a, b in zip(carried, values[1:], twice[1:], strict=True))
        return OnnxCut(self, session, layer, tuple(carried), kinds, tuple(values[1:]), tuple(twice[1:]))

    def check_layer(self, layer: str, trace: LayerTrace) -> None:
        """UnknownLayerError unless `layer` names a tensor of the graph."""
        if layer not in trace.shapes:
            raise UnknownLayerError(
                f"unknown tensor {layer!r} in the ONNX graph; see the model's layers for the tensor names",
                candidates=list(trace.spatial[-10:]),
            )


@dataclass(frozen=True)
class OnnxCut:
    """The graph after one tensor: `suffix(rows, image_rows)` gives logits for rows that replace the tensor."""

    graph: OnnxGraph
    session: object
    layer: str
    carried: tuple[str, ...]
    kinds: tuple[str, ...]
    #: each carried value for a batch of one image and of two
    at_one: tuple[Tensor, ...]
    at_two: tuple[Tensor, ...]

    def needs_prefix(self) -> bool:
        return "rows" in self.kinds

    def prefix(self, images: Tensor) -> tuple[Tensor, ...]:
        """The carried values of `images` that have one row per image."""
        return tuple(self.graph.run(images, self.carried)[1:])

    def suffix(self, rows: Tensor, image: int, carried: Sequence[Tensor]) -> Tensor:
        """float32 logits [m, classes] of `rows` [m, ...] in place of the tensor, for image `image` whose
        carried values (`prefix`) are `carried`."""
        count = rows.shape[0]
        feeds: dict[str, object] = {self.layer: rows}
        for name, kind, one, two, value in zip(
            self.carried, self.kinds, self.at_one, self.at_two, carried or self.at_one, strict=True
        ):
            if kind == "rows":
                feeds[name] = value[image : image + 1].expand(count, *value.shape[1:])
            elif kind == "linear":
                feeds[name] = one + (count - 1) * (two - one)
            else:
                feeds[name] = one
        batched = [self.layer, *(n for n, k in zip(self.carried, self.kinds, strict=True) if k == "rows")]
        (logits,) = self.graph._run(self.session, feeds, [self.graph.output], batched)
        return logits.float()


def _image_input(model: onnx.ModelProto) -> ImageInput:
    """The one graph input that is not an initializer: float, [N, C, H, W] with C 1 or 3."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise OnnxGraphError(f"the graph must have one image input, it has {len(inputs)} ({names})")
    (value,) = inputs
    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if tensor.elem_type != TensorProto.FLOAT or len(dims) != 4 or dims[1] not in (1, 3):
        shape = ["?" if d is None else d for d in dims]
        kind = TensorProto.DataType.Name(tensor.elem_type)
        raise OnnxGraphError(
            f"input {value.name!r} is {kind} {shape}; an image input is FLOAT [N, C, H, W] with 1 or 3 channels"
        )
    return ImageInput(value.name, dims[0], int(dims[1]), (dims[2], dims[3]))


def _dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """Each tensor's element type, from shape inference (tensors it cannot type are left out)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    graph = inferred.graph
    return {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}


def _dependents(graph: onnx.GraphProto, sources: set[str]) -> set[str]:
    """Tensors computed from any of `sources` (themselves included); nodes are in topological order."""
    found = set(sources)
    for node in graph.node:
        if any(i in found for i in node.input):
            found.update(node.output)
    return found


def _value_info_of(name: str, value: Tensor) -> onnx.ValueInfoProto:
    dtype = helper.np_dtype_to_tensor_dtype(value.numpy().dtype)
    shape: list[int | str] = ["batch", *value.shape[1:]] if value.dim() else []
    return helper.make_tensor_value_info(name, dtype, shape)


def _kind(name: str, one: Tensor, two: Tensor) -> str:
    """How a carried value depends on the batch (module docstring), from its values at batch sizes 1 and 2."""
    if one.is_floating_point():
        return "rows" if one.dim() and one.shape[0] == 1 and two.shape[0] == 2 else "fixed"
    if one.shape != two.shape:
        raise SplitError(f"the rest of the graph reads {name!r}, whose shape depends on the batch size")
    return "fixed" if torch.equal(one, two) else "linear"
