"""kind = "entrypoint": "package.module:factory" returning an nn.Module; optional `weights` (a state dict)."""

from __future__ import annotations

import importlib
from typing import Literal

from pydantic import model_validator
from torch import nn

from camserve.models.errors import ModelConfigError
from camserve.models.preprocessing import Preprocessing
from camserve.models.sources.base import Built, LocalPath, Source
from camserve.models.weights import load_into, load_state_dict


class EntrypointSource(Source):
    kind: Literal["entrypoint"]
    entrypoint: str | None = None
    weights: LocalPath | None = None

    @model_validator(mode="after")
    def _needs_entrypoint(self) -> EntrypointSource:
        if not (self.entrypoint and ":" in self.entrypoint):
            raise ValueError('an entrypoint model needs `entrypoint = "package.module:factory"`')
        return self

    def build(self) -> Built:
        module_name, _, attr = (self.entrypoint or "").partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ModelConfigError(f"entry point {self.entrypoint!r} not found ({exc})") from exc
        model = factory()
        if not isinstance(model, nn.Module):
            raise ModelConfigError(f"entry point {self.entrypoint!r} returned {type(model).__name__}, not an nn.Module")
        if self.weights is not None:
            load_into(model, load_state_dict(self.weights), str(self.entrypoint))
        return Built(model, str(self.entrypoint), Preprocessing((224, 224)))
