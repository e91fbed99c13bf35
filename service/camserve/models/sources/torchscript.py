"""kind = "torchscript": a TorchScript file (predicts only: scripted modules take no hooks)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import model_validator

from camserve.models.errors import ModelConfigError
from camserve.models.preprocessing import Preprocessing
from camserve.models.sources.base import Built, LocalPath, Source
from camserve.models.weights import existing


class TorchScriptSource(Source):
    kind: Literal["torchscript"]
    weights: LocalPath | None = None

    @model_validator(mode="after")
    def _needs_file(self) -> TorchScriptSource:
        if self.weights is None:
            raise ValueError("a torchscript model needs `weights` (the TorchScript file)")
        return self

    def build(self) -> Built:
        path = existing(self.weights)
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelConfigError(f"{path} is not a TorchScript file ({exc})") from exc
        return Built(module, "torchscript", Preprocessing((224, 224)))
