"""What every model source has: validated fields, and a `build` giving the module, its labels and preprocessing."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Annotated, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, model_validator
from torch import fx, nn

from camserve.cam.heads import Head
from camserve.cam.onnx_graph import OnnxGraph
from camserve.models.errors import ModelConfigError
from camserve.models.preprocessing import Preprocessing
from camserve.models.weights import existing


def _relative_to_models_file(value: Path, info: ValidationInfo) -> Path:
    """Relative paths are relative to the models file (its folder is the validation context's `base`)."""
    base = (info.context or {}).get("base")
    return base / value if base is not None and not value.is_absolute() else value


LocalPath = Annotated[Path, AfterValidator(_relative_to_models_file)]
"""A path in the models file: relative to the file's folder."""


@dataclass
class Built:
    """A source's module on the CPU with its weights, plus what the source says about using it."""

    #: a PyTorch module, or an ONNX graph (kind "onnx")
    module: nn.Module | OnnxGraph
    architecture: str
    preprocessing: Preprocessing
    labels: list[str] | None = None
    #: what the source says its logits mean (a Hugging Face `problem_type`); None: it does not say
    head: Head | None = None
    #: the model's own exported graph, batch dimension dynamic (kind "exported"): split instead of exporting again
    graph: fx.GraphModule | None = None
    #: what in the model fixes `preprocessing.channels` (e.g. "its config's num_channels"); None: nothing does, so
    #: the models file may set it
    channels_from: str | None = None


class Source(BaseModel):
    """One `kind` of model: its fields (validated with the models file) and how to build it."""

    model_config = ConfigDict(extra="forbid")

    def build(self) -> Built:
        raise NotImplementedError


class FileSource(Source):
    """A kind whose whole model is one file, `weights` (TorchScript, ONNX, torch.export); `file_words` says which."""

    weights: LocalPath | None = None
    #: what the missing-file message calls the model and its file
    file_words: ClassVar[str] = "a model needs `weights`"

    @model_validator(mode="after")
    def _needs_file(self) -> FileSource:
        if self.weights is None:
            raise ValueError(self.file_words)
        return self

    def path(self) -> Path:
        """The file, or a ModelConfigError when it does not exist."""
        return existing(self.weights)


def import_extra(module: str, extra: str) -> ModuleType:
    """Import an optional dependency, or a ModelConfigError saying which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelConfigError(
            f"this model needs the optional package {module!r} ({exc}); "
            f"install it with: pip install 'camserve[{extra}]'"
        ) from exc
