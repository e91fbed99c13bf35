"""Loaded models: built once at start-up, moved to their device, frozen, warmed up."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from camserve.cam import CamEngine, UnknownLayerError
from camserve.cam.heads import Head
from camserve.cam.onnx_engine import OnnxEngine
from camserve.cam.onnx_graph import OnnxGraph
from camserve.cam.runtime import Bucket
from camserve.device import configure_device, no_cuda_message
from camserve.errors import InvalidParameterError, UnknownModelError
from camserve.models.errors import ModelConfigError
from camserve.models.loader import build_model
from camserve.models.preprocessing import Preprocessing
from camserve.models.runtimes import (
    RuntimeChoice,
    artifacts_cached,
    choose_runtime,
    default_cache_dir,
    deferrable,
)
from camserve.models.spec import ModelsFile, ModelSpec, default_models, read_models_file
from camserve.numbers import whole_number
from camserve.settings import RuntimeMode, Settings

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """auto = CUDA when available, else CPU; asking for CUDA without one fails at start-up, saying why."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError(no_cuda_message())
    return torch.device(name)


@dataclass
class ServedModel:
    """One model as the service uses it."""

    spec: ModelSpec
    module: nn.Module | OnnxGraph
    engine: CamEngine | OnnxEngine
    labels: list[str]
    device: torch.device
    default_layer: str | None
    load_seconds: float
    preprocessing: Preprocessing
    architecture: str
    #: what runs its forwards, per batch-size bucket
    runtime: RuntimeChoice = field(default_factory=lambda: RuntimeChoice("eager"))
    #: what a rerun of the network after the default layer costs in forwards (`cam.costs`; 1 when not measured)
    rerun_fraction: float = 1.0

    @property
    def explainable(self) -> bool:
        """Whether any method explains it (every model that gives logits: RISE reads no layer)."""
        return bool(self.methods)

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods that explain it: every one for PyTorch modules; for forms without hooks or autograd
        (TorchScript, ONNX) those that need neither."""
        return self.engine.methods

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def platform(self) -> str:
        """What runs it, in OIP v2's words: "onnxruntime_onnx" for ONNX models, else "pytorch"."""
        return "onnxruntime_onnx" if isinstance(self.module, OnnxGraph) else "pytorch"

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def head(self) -> Head:
        """softmax or sigmoid: what the probabilities of its logits are."""
        return self.engine.head

    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocessing.input_size

    @property
    def channels(self) -> int:
        """Input channels: 3 (RGB) or 1 (luminance)."""
        return self.preprocessing.channels

    @property
    def mean(self) -> tuple[float, ...]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.preprocessing.std

    @property
    def interpolation(self) -> str:
        return self.preprocessing.interpolation

    @property
    def example(self) -> torch.Tensor:
        """A zero input of one image, as warm-up and the runtime's checks use."""
        return torch.zeros(1, self.channels, *self.input_size, device=self.device)

    def finish_runtime(self, *, max_batch: int, cache_dir: Path) -> None:
        """Choose the runtime left `building` at load, now that the background build filled the cache: check, time
        and switch over (seconds, on the torch thread between batches), then warm up and re-measure the rerun cost."""
        assert isinstance(self.engine, CamEngine)
        example = self.example
        if not artifacts_cached(self.engine, example, cache_dir=cache_dir):  # never export here, between batches
            raise ModelConfigError(
                "the export process wrote no graph for this model as this process has it (are its weights random, "
                "different in each process?)"
            )
        self.runtime = choose_runtime(
            self.name,
            self.engine,
            example,
            mode=self.runtime.mode,
            max_batch=max_batch,
            warmup=True,
            cache_dir=cache_dir,
        )
        self.engine.explain(example, method="gradcampp")
        self.rerun_fraction = _rerun_fraction(self.name, self.engine, example)

    def class_index(self, target: int | str) -> int:
        """A class index from an index (int or digit string) or an exact label."""
        if isinstance(target, int) and not isinstance(target, bool):
            index = target
        elif isinstance(target, str) and (number := whole_number(target, signed=True)) is not None:
            index = number
        else:
            label = str(target)
            if label not in self._label_index:
                raise InvalidParameterError(
                    f"unknown label {label!r} for model {self.name!r}; give a class index 0..{self.num_classes - 1} "
                    f"or an exact label (see /models/{self.name}/labels)"
                )
            return self._label_index[label]
        if not 0 <= index < self.num_classes:
            raise InvalidParameterError(
                f"class index {index} is out of range for model {self.name!r} ({self.num_classes} classes)"
            )
        return index

    def __post_init__(self) -> None:
        self._label_index: dict[str, int] = {}
        for i, label in enumerate(self.labels):
            self._label_index.setdefault(label, i)


def _head(spec: ModelSpec, said: Head | None, num_classes: int) -> Head:
    """The head the models file names, else what the model says (a single logit is sigmoid), else softmax; a
    models file contradicting the model is a ModelConfigError."""
    why = "its config's problem_type" if said is not None else "it has a single output"
    model_says = said or ("sigmoid" if num_classes == 1 else None)
    if spec.head is not None and model_says is not None and spec.head != model_says:
        raise ModelConfigError(f"model {spec.name!r}: head = {spec.head!r} contradicts the model ({why}: {model_says})")
    return spec.head or model_says or "softmax"


def load_model(
    spec: ModelSpec,
    device: torch.device,
    warmup: bool = True,
    runtime: RuntimeMode = "eager",
    max_batch: int = 16,
    masked_batch_size: int = 32,
    cache_dir: Path | None = None,
    measure_compiled: bool = False,
    defer_runtime: bool = False,
) -> ServedModel:
    """Build, move, freeze and (optionally) warm up one model; choose its runtime as `runtime` (or the spec's
    own `runtime`) says, for batches up to `max_batch` (`camserve.models.runtimes`). `masked_batch_size`: inputs
    per extra forward of Score-CAM and Ablation-CAM. `defer_runtime`: where choosing would export, serve eagerly and
    leave it to `ServedModel.finish_runtime` after the background build (`camserve.models.background`)."""
    started = time.perf_counter()
    built = build_model(spec)
    height, width = built.preprocessing.input_size
    onnx = isinstance(built.module, OnnxGraph)
    if onnx:
        device = _place_onnx(spec, built.module, device, (height, width))
        engine: CamEngine | OnnxEngine = OnnxEngine(
            built.module, default_layer=spec.default_layer, rerun_batch_size=masked_batch_size
        )
        module: nn.Module | OnnxGraph = built.module
    else:
        module = built.module.to(device).eval()
        autocast = _DTYPES.get(spec.dtype)
        if autocast is torch.float16 and device.type != "cuda":
            raise ModelConfigError(f"model {spec.name!r}: dtype float16 needs a CUDA device (got {device})")
        engine = CamEngine(
            module, autocast_dtype=autocast, default_layer=spec.default_layer, rerun_batch_size=masked_batch_size
        )
        if built.graph is not None:
            engine.adopt_export(built.graph.to(device))
    channels = built.preprocessing.channels
    example = torch.zeros(1, channels, height, width, device=device)
    reads_layers = onnx or not isinstance(module, torch.jit.ScriptModule)  # TorchScript modules take no hooks
    default_layer: str | None = None
    try:
        if reads_layers:
            engine.trace(example)
        logits = engine.predict(example)
    except ModelConfigError:
        raise
    except Exception as exc:
        hint = "" if built.channels_from else " (if it takes another number of channels, set `channels`)"
        raise ModelConfigError(
            f"model {spec.name!r}: a forward pass on a {channels}-channel {height}x{width} input failed: {exc}{hint}"
        ) from exc
    if reads_layers:
        try:
            (default_layer,) = engine.resolve_layers(None)  # the configured one, else the informative one
        except UnknownLayerError as exc:
            what = "default_layer: " if spec.default_layer else "cannot explain: "
            raise ModelConfigError(f"model {spec.name!r}: {what}{exc}") from exc
        if spec.default_layer is None and engine.trace().default is None:
            log.warning(
                "model %s: no layer's %s reaches its grid on a probe image (a zero-initialised or untrained "
                "head?); explaining %s by default, whose maps will be zero",
                spec.name,
                "zeroing" if onnx else "gradient",
                default_layer,
            )
    if logits.dim() != 2:
        raise ModelConfigError(f"model {spec.name!r}: output shape {tuple(logits.shape)} is not [batch, classes]")
    num_classes = logits.shape[1]
    labels = built.labels or [str(i) for i in range(num_classes)]
    if len(labels) != num_classes:
        raise ModelConfigError(f"model {spec.name!r}: {len(labels)} labels for a model with {num_classes} outputs")
    engine.use_head(_head(spec, built.head, num_classes))
    if isinstance(engine, OnnxEngine):
        choice = RuntimeChoice("onnxruntime", buckets=[Bucket(max_batch, "onnxruntime")])  # the whole graph
        if warmup:
            engine.explain(example, method="eigencam")
    elif not reads_layers:
        choice = RuntimeChoice("eager", not_used={"every backend": "TorchScript (no split: whole-model forwards only)"})
    else:
        mode = spec.runtime or runtime
        cache = cache_dir or default_cache_dir()
        if defer_runtime and warmup and deferrable(engine, example, mode=mode, cache_dir=cache):
            choice = RuntimeChoice(mode, building=True)  # eager until `finish_runtime`
        else:
            choice = choose_runtime(
                spec.name,
                engine,
                example,
                mode=mode,
                max_batch=max_batch,
                warmup=warmup,
                cache_dir=cache,
                measure_compiled=measure_compiled,
            )
        if warmup:
            engine.explain(example, method="gradcampp")
    rerun_fraction = _rerun_fraction(spec.name, engine, example) if warmup and reads_layers else 1.0
    return ServedModel(
        spec=spec,
        module=module,
        engine=engine,
        labels=labels,
        device=device,
        default_layer=default_layer,
        load_seconds=time.perf_counter() - started,
        preprocessing=built.preprocessing,
        architecture=built.architecture,
        runtime=choice,
        rerun_fraction=rerun_fraction,
    )


def _rerun_fraction(name: str, engine: CamEngine | OnnxEngine, example: torch.Tensor) -> float:
    """What a rerun after the default layer costs in forwards (`cam.costs`), measured; 1 where it cannot be."""
    try:
        return engine.suffix_fraction(example)
    except Exception as exc:  # not cut or hooked there: its reruns count as whole forwards
        log.warning("model %s: the cost of a rerun after the default layer is not measured (%s)", name, exc)
        return 1.0


def _place_onnx(spec: ModelSpec, graph: OnnxGraph, device: torch.device, size: tuple[int, int]) -> torch.device:
    """Where an ONNX model's inputs go; a models file contradicting the graph's fixed input size, or asking for
    what ONNX Runtime does not do here, stops start-up."""
    fixed = graph.input.size
    if None not in fixed and tuple(fixed) != size:
        raise ModelConfigError(
            f"model {spec.name!r}: input_size {list(size)} contradicts the ONNX graph's fixed input {list(fixed)}"
        )
    if spec.dtype != "float32":
        raise ModelConfigError(f"model {spec.name!r}: an ONNX model runs as its graph is typed; remove dtype")
    return graph.place(device)


class ModelRegistry:
    """The models a process serves, by name; exactly one is the default."""

    def __init__(self, models: Sequence[ServedModel], default: str) -> None:
        self._models = {m.name: m for m in models}
        self.default_name = default

    @classmethod
    def load(
        cls,
        models_file: Path | None,
        device: str = "auto",
        warmup: bool = True,
        allow_tf32: bool = False,
        *,
        runtime: RuntimeMode = "eager",
        max_batch: int = 16,
        cache_dir: Path | None = None,
        masked_batch_size: int = 32,
        measure_compiled: bool = False,
        defer_runtime: bool = False,
    ) -> ModelRegistry:
        """Read the models file, set up the device (TF32 as configured, logged once) and load every model on the
        runtime `runtime` and each model's own setting say (`measure_compiled`: `auto` times inductor too;
        `defer_runtime`: see `load_model`)."""
        config: ModelsFile = read_models_file(models_file) if models_file else default_models()
        target = resolve_device(device)
        configure_device(target, allow_tf32)
        loaded = []
        for spec in config.models:
            served = load_model(
                spec,
                target,
                warmup=warmup,
                runtime=runtime,
                max_batch=max_batch,
                masked_batch_size=masked_batch_size,
                cache_dir=cache_dir,
                measure_compiled=measure_compiled,
                defer_runtime=defer_runtime,
            )
            log.info("loaded model %s on %s in %.2fs", spec.name, target, served.load_seconds)
            loaded.append(served)
        return cls(loaded, config.default_name)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, measure_compiled: bool = False, defer_runtime: bool = False
    ) -> ModelRegistry:
        """`load` with the service's settings."""
        return cls.load(
            settings.models_file,
            settings.device,
            settings.warmup,
            settings.allow_tf32,
            runtime=settings.runtime,
            max_batch=settings.max_batch_size,
            cache_dir=settings.cache_dir,
            masked_batch_size=settings.masked_batch_size,
            measure_compiled=measure_compiled,
            defer_runtime=defer_runtime,
        )

    def get(self, name: str | None = None) -> ServedModel:
        """The named model (default when None) or UnknownModelError listing what is served."""
        key = name or self.default_name
        try:
            return self._models[key]
        except KeyError:
            raise UnknownModelError(f"unknown model {key!r}; served models: {', '.join(self._models)}") from None

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)
