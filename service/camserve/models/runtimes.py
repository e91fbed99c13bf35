"""Which runtime serves a loaded model, per batch-size bucket (`CAMSERVE_RUNTIME`, per-model `runtime`).

Candidates are torch eager (the reference), ONNX Runtime and torch compiled (inductor). A candidate must export
and split at the default layer, and its logits (batch 1 and 3) and activation must match eager within the fast
path's tolerances; any failure serves without it, with one log line saying why. Then each bucket of batch sizes
(`runtime.bucket_sizes`) is timed at its largest size, candidates alternating with eager, and the fastest
serves it: a backend slower than eager at a bucket is never served there.

`auto` measures eager against ONNX Runtime at start-up (seconds), and inductor only where `camserve prepare`
measured it (it compiles for 40 s to minutes). `compiled` and `onnxruntime` measure that one backend against
eager. The exported ONNX graph and the decision are cached on disk (the decision per machine, so an image
prepared elsewhere is measured again), and a restart that finds both skips export and measurement.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from camserve.cam import CamEngine
from camserve.cam.fastpath import noise
from camserve.cam.runtime import (
    EAGER,
    Backend,
    Bucket,
    OnnxRuntimeSplit,
    RuntimeTable,
    bucket_sizes,
    export_onnx,
    time_alternating,
)
from camserve.cam.split import ModelSplit, SplitError, load_split, save_split
from camserve.settings import RuntimeMode

log = logging.getLogger(__name__)

#: Largest |backend - eager| logit difference accepted, relative to the largest |logit| (at least 1).
TOLERANCE = {None: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
#: Batch sizes whose logits are compared with eager before a backend may serve (one odd size).
CHECK_SIZES = (1, 3)
#: Bumped when what the cache holds changes meaning.
CACHE_FORMAT = 1


@dataclass
class RuntimeChoice:
    """What a model is served on: the mode asked, each bucket's backend and times, and why a candidate was not
    used."""

    mode: str
    layer: str | None = None
    buckets: list[Bucket] = field(default_factory=list)
    not_used: dict[str, str] = field(default_factory=dict)
    build_s: float = 0.0
    from_cache: bool = False
    #: served eagerly while a child process exports what the backend needs (`camserve.models.background`)
    building: bool = False

    def ranges(self) -> list[tuple[int, Bucket]]:
        """Each bucket with the smallest batch size it serves."""
        lows = [1] + [bucket.largest + 1 for bucket in self.buckets]
        return list(zip(lows, self.buckets, strict=False))

    @property
    def summary(self) -> str:
        """One line: each bucket's backend, or "eager" with the reasons."""
        if self.building:
            return f"eager while {' and '.join(_candidates(self.mode, False))} is built in the background"
        if not self.buckets:
            why = "; ".join(f"{name}: {reason}" for name, reason in self.not_used.items())
            return f"eager ({why})" if why else EAGER
        parts = []
        for low, bucket in self.ranges():
            times = ", ".join(f"{name} {ms:.1f} ms" for name, ms in bucket.ms.items())
            sizes = f"{low}" if low == bucket.largest else f"{low}-{bucket.largest}"
            parts.append(f"batch {sizes}: {bucket.backend}" + (f" ({times})" if times else ""))
        return "; ".join(parts)


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/camserve`, else `~/.cache/camserve`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "camserve"


def set_inductor_cache(cache_dir: Path) -> None:
    """Point inductor's on-disk caches (compiled graphs and kernels) under `cache_dir`, so restarts reuse them."""
    inductor = cache_dir / "inductor"
    try:
        inductor.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only cache (a prepared image): nothing new is cached, all else works
        log.warning("cache %s cannot be written (%s); compiled kernels are not kept", cache_dir, exc)
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use (`CXX`, else c++/g++/clang++ on PATH), or None."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return next((found for name in names if (found := shutil.which(name))), None)


def choose_runtime(
    name: str,
    engine: CamEngine,
    example: torch.Tensor,
    *,
    mode: RuntimeMode,
    max_batch: int,
    warmup: bool,
    cache_dir: Path,
    measure_compiled: bool = False,
) -> RuntimeChoice:
    """Build, check and time the candidates `mode` names, serve each bucket on the fastest (`engine.use_runtime`);
    `measure_compiled` adds inductor to `auto` (what `camserve prepare` does)."""
    started = time.perf_counter()
    choice = RuntimeChoice(mode)
    candidates = _candidates(mode, measure_compiled)
    if not warmup and candidates:
        choice.not_used = dict.fromkeys(candidates, "warm-up is off, and backends are chosen by timing it")
        candidates = []
    if not candidates:
        return _finish(name, engine, choice, None, started)
    folder = cache_dir / "runtime" / _artifact_key(engine, example, engine.default_layer)
    try:
        split = _cached_split(name, engine, example, folder)
    except Exception as exc:  # export's failures are many and all mean "serve eagerly"
        choice.not_used = dict.fromkeys(candidates, _reason(exc))
        return _finish(name, engine, choice, None, started)
    choice.layer = split.layer
    sizes = bucket_sizes(max_batch)  # larger batches (Score-CAM's masked forwards) go to the last bucket
    decision_path = folder / f"decision-{_machine_key(engine.device)}.json"
    # `prepare` times afresh: a decision made without inductor must not keep it from being timed
    decided = _read_decision(decision_path, sizes) if mode == "auto" and not measure_compiled else None
    if decided is not None:
        candidates = sorted({bucket.backend for bucket in decided} - {EAGER})
    backends: dict[str, Backend] = {}
    for candidate in candidates:
        try:
            backend = _build(candidate, engine, split, example, max_batch, folder)
            _check(engine, backend, example)
        except Exception as exc:
            choice.not_used[candidate] = _reason(exc)
            continue
        backends[candidate] = backend
    if decided is not None and set(candidates) <= set(backends):
        choice.buckets, choice.from_cache = decided, True
    elif backends:
        choice.buckets = _measure(engine, backends, example, sizes)
        try:
            _write_decision(decision_path, choice.buckets)
        except OSError as exc:
            log.warning("model %s: the runtime decision is not cached (%s)", name, exc)
    table = RuntimeTable(split.layer, choice.buckets, backends) if backends else None
    if table is not None and table.served() == {EAGER}:
        table = None
    return _finish(name, engine, choice, table, started)


def deferrable(engine: CamEngine, example: torch.Tensor, *, mode: RuntimeMode, cache_dir: Path) -> bool:
    """Whether choosing `mode`'s runtime would export (seconds to minutes) and the export can run in a child process
    after readiness (`export_artifacts`): ONNX Runtime is a candidate, its split or prefix is not in the cache, and
    the cache can be written. Inductor compiles in this process, and reduced precision never runs on ONNX Runtime:
    never deferred."""
    if _candidates(mode, False) != ["onnxruntime"] or engine.autocast_dtype is not None:
        return False
    if artifacts_cached(engine, example, cache_dir=cache_dir):
        return False
    folder = cache_dir / "runtime" / _artifact_key(engine, example, engine.default_layer)
    try:  # the child hands its export over through the cache: a read-only one builds here, before readiness
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def artifacts_cached(engine: CamEngine, example: torch.Tensor, *, cache_dir: Path) -> bool:
    """Whether the cache holds the split at the default layer and its ONNX prefix for this model and input."""
    folder = cache_dir / "runtime" / _artifact_key(engine, example, engine.default_layer)
    return all((folder / file).is_file() for file in ("split.pt", "prefix.onnx"))


def export_artifacts(name: str, engine: CamEngine, example: torch.Tensor, *, cache_dir: Path) -> None:
    """Write the split at the default layer and its prefix as ONNX to the cache, without building, checking or
    timing anything: what `choose_runtime` then reads instead of exporting (the background build's child)."""
    folder = cache_dir / "runtime" / _artifact_key(engine, example, engine.default_layer)
    split = _cached_split(name, engine, example, folder)
    if not (folder / "prefix.onnx").is_file():
        export_onnx(split, example, folder / "prefix.onnx")


def _candidates(mode: RuntimeMode, measure_compiled: bool) -> list[str]:
    if mode == "eager":
        return []
    if mode == "auto":
        return ["onnxruntime", "compiled"] if measure_compiled else ["onnxruntime"]
    return [mode]


def _cached_split(name: str, engine: CamEngine, example: torch.Tensor, folder: Path) -> ModelSplit:
    """The split at the default layer from `folder` (0.3 s for EfficientNet-Lite0), else exported (1.5-2 s) and
    stored there."""
    path = folder / "split.pt"
    if path.is_file():
        try:
            split = load_split(path, engine.device)
        except Exception as exc:  # a cache written by another version, or cut off: export again
            log.warning("model %s: the cached split cannot be read (%s); exporting again", name, _reason(exc))
        else:
            engine.adopt_split(split)
            return split
    split = engine.split(example)
    try:
        save_split(split, path)
    except (OSError, SplitError) as exc:
        log.warning("model %s: the split is not cached (%s)", name, _reason(exc))
    return split


def _build(
    candidate: str, engine: CamEngine, split: ModelSplit, example: torch.Tensor, max_batch: int, folder: Path
) -> Backend:
    if candidate == "compiled":
        if engine.autocast_dtype is None and cxx_compiler() is None:
            raise SplitError("no C++ compiler on PATH (inductor needs one; set CXX or install g++)")
        set_inductor_cache(folder.parent.parent)
        return engine.compile(example, max_batch=max_batch, split=split)
    if engine.autocast_dtype is not None:
        raise SplitError("the model runs in reduced precision (dtype), which the ONNX path does not serve")
    path = folder / "prefix.onnx"
    if not path.is_file():
        export_onnx(split, example, path)
    return OnnxRuntimeSplit(split, path, device=engine.device, threads=torch.get_num_threads())


def _check(engine: CamEngine, backend: Backend, example: torch.Tensor) -> None:
    """Raise unless the backend's logits (at CHECK_SIZES) and activation match eager within TOLERANCE."""
    scale = max(1.0, engine.predict_eager(example).abs().max().item())
    tolerance = TOLERANCE.get(engine.autocast_dtype, 1e-3) * scale
    for size in CHECK_SIZES:
        images = noise(example, size)
        error = (backend.logits(images).float() - engine.predict_eager(images)).abs().max().item()
        if not error <= tolerance:
            raise SplitError(f"its logits differ from eager by {error:.3g} (> {tolerance:.3g}) at batch {size}")
    engine.check_backend(backend, example)


def _measure(engine: CamEngine, backends: dict[str, Backend], example: torch.Tensor, sizes: list[int]) -> list[Bucket]:
    """Each bucket's fastest of eager and `backends`, timed in turns at the bucket's largest size."""
    buckets = []
    for size in sizes:
        functions: dict[str, Callable[[torch.Tensor], object]] = {EAGER: engine.predict_eager}
        functions |= {name: backend.logits for name, backend in backends.items()}
        ms = time_alternating(functions, noise(example, size))
        buckets.append(Bucket(size, min(ms, key=ms.__getitem__), ms))
    return buckets


def _finish(
    name: str, engine: CamEngine, choice: RuntimeChoice, table: RuntimeTable | None, started: float
) -> RuntimeChoice:
    engine.use_runtime(table)
    choice.build_s = time.perf_counter() - started
    for candidate, why in choice.not_used.items():
        log.info("model %s: %s not used: %s", name, candidate, why)
    cached = ", decided earlier on this machine" if choice.from_cache else ""
    log.info("model %s: runtime %s in %.1fs%s: %s", name, choice.mode, choice.build_s, cached, choice.summary)
    return choice


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0][:300] if text else ""
    return message if isinstance(exc, SplitError) else f"{type(exc).__name__}: {message}"


def _artifact_key(engine: CamEngine, example: torch.Tensor, layer: str) -> str:
    """A digest of what the exported graph depends on: the model's structure and weights, the input shape, the
    layer, the precision and the library versions."""
    digest = hashlib.blake2b(digest_size=16)
    header = [
        CACHE_FORMAT,
        type(engine.model).__qualname__,
        repr(engine.model),
        tuple(example.shape[1:]),
        layer,
        str(engine.autocast_dtype),
        torch.__version__,
        _version("onnxruntime"),
        _version("onnxscript"),
    ]
    digest.update(json.dumps(header, default=str).encode())
    for key, tensor in engine.model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _machine_key(device: torch.device) -> str:
    """A digest of what timings depend on: the processor, the threads, the device."""
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    text = json.dumps([cpu, os.cpu_count(), torch.get_num_threads(), str(device), gpu])
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _read_decision(path: Path, sizes: list[int]) -> list[Bucket] | None:
    """The buckets decided on this machine before, when they cover the same sizes; None otherwise."""
    try:
        stored = json.loads(path.read_text())
        buckets = [Bucket(int(b["largest"]), str(b["backend"]), dict(b["ms"])) for b in stored["buckets"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return buckets if [b.largest for b in buckets] == sizes else None


def _write_decision(path: Path, buckets: list[Bucket]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    rows = [{"largest": b.largest, "backend": b.backend, "ms": dict(b.ms)} for b in buckets]
    partial.write_text(json.dumps({"buckets": rows}, indent=1))
    partial.replace(path)
