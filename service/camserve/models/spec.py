"""What a served model is: the schema of one entry in the models file."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from camserve.cam.heads import Head
from camserve.models.errors import ModelConfigError
from camserve.models.preprocessing import Interpolation
from camserve.models.sources import SOURCE_FIELDS, AnySource, LocalPath
from camserve.settings import RuntimeMode

DEFAULT_MODEL = "efficientnet-lite0"
#: The largest input side a models file may ask for (a 4096 x 4096 input is 200 MB per image as float32).
MAX_INPUT_SIDE = 4096


class ModelSpec(BaseModel):
    """One model. `kind` (default "builtin") picks its source, whose fields sit next to the common ones in
    the same TOML table (see `camserve.models.sources`): builtin, torchvision, torchscript, entrypoint, timm,
    huggingface, onnx, exported. `input_size`, `channels`, `mean`, `std` and `interpolation` override the source's
    preprocessing; `channels` (1 or 3) must agree with a model that says its own (builtin, timm, torchvision,
    Hugging Face, ONNX and exported models do), and `mean` and `std` hold one value per channel.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    source: AnySource
    labels: LocalPath | None = None
    input_size: tuple[int, int] | None = None
    #: input channels: 3 (RGB) or 1 (luminance); None: what the model says, else 3
    channels: Literal[1, 3] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: Interpolation | None = None
    default_layer: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    #: what the logits mean: softmax (one label per image) or sigmoid (independent labels); None: from the model
    #: (a Hugging Face problem_type; a single logit is sigmoid), else softmax
    head: Head | None = None
    #: what runs this model's forwards (see service.models.runtimes): None follows CAMSERVE_RUNTIME
    runtime: RuntimeMode | None = None
    default: bool = False

    @model_validator(mode="before")
    @classmethod
    def _gather_source(cls, data: Any) -> Any:
        """The flat TOML table -> common fields + `source` (its `kind` and the fields of that kind)."""
        if not isinstance(data, dict) or "source" in data:
            return data
        if "compile" in data:
            raise ValueError(
                '`compile` was replaced by `runtime` ("off" is "eager"; "auto" is "compiled", or "auto" '
                "for the fastest of every backend)"
            )
        common = {k: v for k, v in data.items() if k not in SOURCE_FIELDS}
        source = {k: v for k, v in data.items() if k in SOURCE_FIELDS}
        source.setdefault("kind", "builtin")
        if source["kind"] == "builtin" and "name" in data:
            source.setdefault("architecture", data["name"])
        return {**common, "source": source}

    @model_validator(mode="after")
    def _check_values(self) -> ModelSpec:
        if self.std is not None and any(s == 0 for s in self.std):
            raise ValueError("std values must be non-zero")
        given = {name: len(v) for name, v in (("mean", self.mean), ("std", self.std)) if v is not None}
        if any(count not in (1, 3) for count in given.values()):
            raise ValueError(f"mean and std hold one value per input channel (1 or 3), got {given}")
        if len(set(given.values())) > 1:
            raise ValueError(f"mean and std must have as many values as each other, got {given}")
        if self.channels is not None and any(count != self.channels for count in given.values()):
            raise ValueError(f"mean and std need {self.channels} value(s) for channels = {self.channels}, got {given}")
        if self.input_size is not None and not all(1 <= side <= MAX_INPUT_SIDE for side in self.input_size):
            raise ValueError(f"input_size values must be from 1 to {MAX_INPUT_SIDE}")
        if self.kind == "onnx" and self.runtime not in (None, "onnxruntime"):
            raise ValueError(f"an onnx model runs on ONNX Runtime, so runtime = {self.runtime!r} cannot apply")
        if self.kind == "torchscript":
            ignored = ["default_layer"] if self.default_layer is not None else []
            ignored += ["runtime"] if self.runtime not in (None, "eager") else []  # eager is what it gets anyway
            if ignored:
                raise ValueError(
                    f"a torchscript model takes no hooks (it explains only with methods that read no layer), so "
                    f"{' and '.join(ignored)} cannot apply; remove {'them' if len(ignored) > 1 else 'it'}"
                )
        return self

    @property
    def kind(self) -> str:
        return self.source.kind


class ModelsFile(BaseModel):
    """The TOML models file: `[[models]]` tables and an optional top-level `default = "name"`."""

    model_config = ConfigDict(extra="forbid")

    default: str | None = None
    models: list[ModelSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_default(self) -> ModelsFile:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        flagged = [m.name for m in self.models if m.default]
        if len(flagged) > 1:
            raise ValueError(f"only one model can have default = true; got {', '.join(flagged)}")
        if self.default is not None and self.default not in names:
            raise ValueError(f"default model {self.default!r} is not among the models: {', '.join(names)}")
        if self.default is not None and flagged and flagged != [self.default]:
            raise ValueError(f"default = {self.default!r} contradicts model {flagged[0]!r}'s default = true")
        return self

    @property
    def default_name(self) -> str:
        flagged = [m.name for m in self.models if m.default]
        return self.default or (flagged[0] if flagged else self.models[0].name)


def default_models() -> ModelsFile:
    """The embedded configuration: EfficientNet-Lite0 with its ImageNet weights."""
    return ModelsFile(models=[ModelSpec(name=DEFAULT_MODEL, kind="builtin", default=True)])


def read_models_file(path: Path) -> ModelsFile:
    """Parse and validate a models file (relative paths are relative to it); errors name the file, model, problem."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelConfigError(f"models file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ModelConfigError(f"models file {path} cannot be read: {exc}") from None
    try:
        return ModelsFile.model_validate(raw, context={"base": path.parent})
    except ValidationError as exc:
        problems = [_describe(raw, list(error["loc"]), error["msg"]) for error in exc.errors()]
        raise ModelConfigError(f"models file {path} is invalid: " + "; ".join(problems)) from None


def _describe(raw: dict, loc: list, message: str) -> str:
    """'model NAME field FIELD: message' for one validation error (the `source` level is the file's own table)."""
    message = message.removeprefix("Value error, ")
    if not loc:  # a check across the whole file
        return message
    if not (len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int)):
        return f"{'.'.join(str(p) for p in loc)}: {message}"
    entries = raw.get("models") or []
    entry = entries[loc[1]] if loc[1] < len(entries) and isinstance(entries[loc[1]], dict) else {}
    field = loc[2:]
    if field[:1] == ["source"]:
        field = field[2:] if len(field) > 1 else ["kind"]  # drop `source` and the kind's tag
    where = f"model {entry.get('name', f'#{loc[1] + 1}')!r}"
    return where + (f" field {'.'.join(str(p) for p in field)}" if field else "") + f": {message}"
