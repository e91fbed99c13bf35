"""Model sources: one class per `kind` of the models file, as a pydantic discriminated union."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from camserve.models.sources.base import Built, LocalPath, Source
from camserve.models.sources.builtin import BUILTIN_MODELS, BuiltinSource
from camserve.models.sources.entrypoint import EntrypointSource
from camserve.models.sources.exported import ExportedSource
from camserve.models.sources.huggingface import HuggingFaceSource, LogitsOnly
from camserve.models.sources.onnx_file import OnnxSource
from camserve.models.sources.timm_models import TimmSource
from camserve.models.sources.torchscript import TorchScriptSource
from camserve.models.sources.torchvision_models import TorchvisionSource

SOURCES: tuple[type[Source], ...] = (
    BuiltinSource,
    TorchvisionSource,
    TorchScriptSource,
    EntrypointSource,
    TimmSource,
    HuggingFaceSource,
    OnnxSource,
    ExportedSource,
)
AnySource = Annotated[Union[SOURCES], Field(discriminator="kind")]  # noqa: UP007  # the union of SOURCES
SOURCE_FIELDS: frozenset[str] = frozenset(name for cls in SOURCES for name in cls.model_fields)
"""Keys of a models-file entry that belong to its source (`kind` included)."""

__all__ = [
    "BUILTIN_MODELS",
    "SOURCES",
    "SOURCE_FIELDS",
    "AnySource",
    "Built",
    "BuiltinSource",
    "EntrypointSource",
    "ExportedSource",
    "HuggingFaceSource",
    "LocalPath",
    "LogitsOnly",
    "OnnxSource",
    "Source",
    "TimmSource",
    "TorchScriptSource",
    "TorchvisionSource",
]
