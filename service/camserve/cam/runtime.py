"""Runtimes for the work that needs no autograd, under the split at the default layer.

A backend runs a `ModelSplit`'s prefix (images -> the layer's activation and the values the rest reads) and
gives back torch tensors; autograd runs over the suffix only, in torch, whichever backend ran the prefix.
Predictions are prefix then suffix without autograd. Three backends: torch eager (the hooked model: the
reference, no object here), torch compiled (`fastpath.CompiledSplit`) and ONNX Runtime (`OnnxRuntimeSplit`).

A `RuntimeTable` says which backend serves each batch-size bucket, as measured at warm-up
(`camserve.models.runtimes` measures and chooses). Measured on a 2-core CPU (EfficientNet-Lite0, 8 images,
docs/benchmarks.md): predictions 55 ms with the prefix on ONNX Runtime, 270 ms eager; a session builds in
0.1-0.2 s once the prefix is exported (5-9 s, cached on disk).
"""

from __future__ import annotations

import bisect
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from camserve.cam.split import ModelSplit, SplitError, batch_multiple, carried_kinds

log = logging.getLogger(__name__)

EAGER = "eager"
T = TypeVar("T")


class Backend(Protocol):
    """One way to run a split's halves without autograd."""

    name: str
    layer: str

    def prefix(self, images: Tensor) -> tuple[Tensor, tuple[object, ...]]:
        """The layer's activation and the values the suffix also reads."""
        ...

    def suffix(self, activation: Tensor, carried: tuple[object, ...]) -> Tensor:
        """Logits from an activation, recording autograd when grad mode is on."""
        ...

    def logits(self, images: Tensor) -> Tensor:
        """Logits of a plain forward."""
        ...


class OnnxRuntimeSplit:
    """A split whose prefix runs on ONNX Runtime (CPU provider; CUDA or TensorRT on a GPU where installed), its
    suffix in torch."""

    name = "onnxruntime"

    def __init__(self, split: ModelSplit, path: Path, *, device: torch.device, threads: int) -> None:
        """`path`: the prefix as ONNX (`export_onnx`). `threads`: intra-op threads (the torch thread's count)."""
        import onnxruntime as ort

        self.split = split
        self.layer = split.layer
        self.device = device
        kinds = carried_kinds(split)
        if any(kind == "fixed" for kind in kinds):
            raise SplitError("a value the rest of the network reads does not depend on the batch (not exportable)")
        self._kinds = kinds
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # no spinning after a run: torch's suffix and backward follow on the same cores at once (with spinning
        # on, an eager forward right after a session run measured 2.4x slower on two cores)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.providers = onnx_providers(device)
        self._session = ort.InferenceSession(str(path), options, providers=self.providers)
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1 + len(kinds):
            raise SplitError(
                f"the ONNX prefix has {len(inputs)} inputs and {len(outputs)} outputs, not 1 and {1 + len(kinds)}"
            )
        self._input = inputs[0].name
        # sizes that are multiples of the batch size are known here; only tensors come back from the session
        self._tensors = [outputs[0].name] + [o.name for o, k in zip(outputs[1:], kinds, strict=True) if k == "rows"]
        self._shapes = [o.shape for o in outputs if o.name in self._tensors]

    def prefix(self, images: Tensor) -> tuple[Tensor, tuple[object, ...]]:
        values = self._run_cuda(images) if self.device.type == "cuda" else self._run_cpu(images)
        activation, rest = values[0], iter(values[1:])
        batch = images.shape[0]
        carried = tuple(
            next(rest) if (multiple := batch_multiple(kind)) is None else multiple * batch for kind in self._kinds
        )
        return activation, carried

    def suffix(self, activation: Tensor, carried: tuple[object, ...]) -> Tensor:
        return self.split.suffix(activation, *carried)

    def logits(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            activation, carried = self.prefix(images)
            return self.suffix(activation, carried).float()

    def _run_cpu(self, images: Tensor) -> list[Tensor]:
        feed = images.detach().to(torch.float32).contiguous().numpy()
        return [torch.from_numpy(value) for value in self._session.run(self._tensors, {self._input: feed})]

    def _run_cuda(self, images: Tensor) -> list[Tensor]:
        """Device to device through an IO binding: outputs are torch tensors the session writes into."""
        images = images.detach().to(torch.float32).contiguous()
        binding = self._session.io_binding()
        index = images.device.index or 0
        binding.bind_input(self._input, "cuda", index, np.float32, tuple(images.shape), images.data_ptr())
        outputs = []
        for name, shape in zip(self._tensors, self._shapes, strict=True):
            dims = [images.shape[0] if not isinstance(d, int) else d for d in shape]
            out = torch.empty(dims, dtype=torch.float32, device=images.device)
            binding.bind_output(name, "cuda", index, np.float32, tuple(dims), out.data_ptr())
            outputs.append(out)
        torch.cuda.current_stream(images.device).synchronize()  # the session runs on its own stream
        self._session.run_with_iobinding(binding)
        return outputs


def onnx_providers(device: torch.device) -> list[str]:
    """ONNX Runtime's providers for `device`, best first: TensorRT and CUDA where installed on a GPU host, the CPU
    provider always last."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if device.type == "cuda" else []
    chosen = [p for p in wanted if p in available]
    if device.type == "cuda" and not chosen:
        raise SplitError("onnxruntime has no CUDA provider here (install onnxruntime-gpu)")
    return [*chosen, "CPUExecutionProvider"]


def export_onnx(split: ModelSplit, example: Tensor, path: Path, max_batch: int = 1024) -> None:
    """Write the split's prefix to `path` as ONNX (batch dimension dynamic), atomically."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    example = example[:1].detach().cpu().float().expand(2, *example.shape[1:]).contiguous()
    prefix = split.prefix.to("cpu").eval()  # ATen operations already; eval() only quiets the exporter
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    for noisy in ("torch.onnx", "onnx_ir", "onnxscript"):  # they log every pass at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        torch.onnx.export(
            prefix,
            (example,),
            str(partial),
            input_names=["images"],
            dynamo=True,
            dynamic_shapes=({0: batch},),
            verbose=False,
            external_data=False,
        )
    except Exception as exc:  # the exporter's failures are many and all mean "not on ONNX Runtime"
        partial.unlink(missing_ok=True)
        text = str(exc).strip().splitlines()
        raise SplitError(
            f"the prefix does not export to ONNX ({type(exc).__name__}: {text[0][:200] if text else ''})"
        ) from exc
    partial.replace(path)


@dataclass(frozen=True)
class Bucket:
    """Batch sizes up to `largest` (above the previous bucket's) and the backend serving them; `ms` the median
    predict times measured at `largest`, per candidate."""

    largest: int
    backend: str
    ms: Mapping[str, float] = field(default_factory=dict)


@dataclass
class RuntimeTable:
    """Which backend serves each batch-size bucket at `layer`; a bucket served eagerly has no backend object."""

    layer: str
    buckets: list[Bucket]
    backends: dict[str, Backend]

    def __post_init__(self) -> None:
        self._bounds = [bucket.largest for bucket in self.buckets]
        #: Calls each backend failed (and that ran eagerly instead).
        self.failures: dict[str, int] = {}

    @classmethod
    def single(cls, backend: Backend) -> RuntimeTable:
        """Every batch size through `backend`."""
        return cls(backend.layer, [Bucket(1 << 30, backend.name)], {backend.name: backend})

    def for_batch(self, size: int) -> Backend | None:
        """The backend for a batch of `size` (beyond the last bucket: the last bucket's); None: eager."""
        index = min(bisect.bisect_left(self._bounds, size), len(self.buckets) - 1)
        return self.backends.get(self.buckets[index].backend)

    def attempt(self, size: int, call: Callable[[Backend], T]) -> T | None:
        """`call` on the backend for a batch of `size`; None when that is eager, or when the backend failed (logged
        once per backend, counted in `failures`): the caller then runs eagerly, so a runtime's fault never fails
        a request that eager torch can answer."""
        backend = self.for_batch(size)
        if backend is None:
            return None
        try:
            return call(backend)
        except Exception as exc:  # any failure of a runtime means: this call runs eagerly
            self.failures[backend.name] = self.failures.get(backend.name, 0) + 1
            if self.failures[backend.name] == 1:
                log.warning(
                    "layer %s: %s failed (%s: %s); such calls run eagerly",
                    self.layer,
                    backend.name,
                    type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "",
                )
            return None

    def served(self) -> set[str]:
        return {bucket.backend for bucket in self.buckets}


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads on the calling thread set to `count` inside the block, then back as they were."""
    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bucket_sizes(max_batch: int) -> list[int]:
    """The batch sizes measured at warm-up, each the largest of its bucket: 1, 8 and `max_batch` (those up to it)."""
    return sorted({size for size in (1, 8, max_batch) if size <= max_batch})


def time_alternating(
    functions: Mapping[str, Callable[[Tensor], object]],
    images: Tensor,
    *,
    rounds: int = 5,
    settle: int = 2,
    margin: float = 1.25,
    budget_s: float = 6.0,
) -> dict[str, float]:
    """Median milliseconds of each function on `images`, timed in turns so that a busy host slows all alike; after
    one untimed call each. Stops after `settle` rounds when the fastest leads every other by `margin` in each round
    (a clear winner needs no more) or when the timed rounds took `budget_s` (a ViT-B forward of 16 images takes 5 s
    here), else runs `rounds`."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    cuda = images.device.type == "cuda"
    with torch.no_grad():
        for fn in functions.values():
            fn(images)
        started = time.perf_counter()
        for done in range(1, rounds + 1):
            for name, fn in functions.items():
                if cuda:
                    torch.cuda.synchronize(images.device)
                begun = time.perf_counter()
                fn(images)
                if cuda:
                    torch.cuda.synchronize(images.device)
                times[name].append((time.perf_counter() - begun) * 1000)
            spent = time.perf_counter() - started
            if done >= settle and (spent >= budget_s or (len(functions) > 1 and _clear(times, margin))):
                break
    return {name: statistics.median(values) for name, values in times.items()}


def _clear(times: dict[str, list[float]], margin: float) -> bool:
    """True when one function was faster than every other by `margin` in every round so far."""
    rounds = len(next(iter(times.values())))
    winners = {min(times, key=lambda name: times[name][r]) for r in range(rounds)}
    if len(winners) != 1:
        return False
    (best,) = winners
    return all(times[other][r] >= margin * times[best][r] for other in times if other != best for r in range(rounds))
