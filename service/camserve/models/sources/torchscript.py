"""kind = "torchscript": a TorchScript file (scripted modules take no hooks: it explains with RISE only)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from camserve.models.errors import ModelConfigError
from camserve.models.preprocessing import Preprocessing
from camserve.models.sources.base import Built, FileSource


class TorchScriptSource(FileSource):
    kind: Literal["torchscript"]
    file_words: ClassVar[str] = "a torchscript model needs `weights` (the TorchScript file)"

    def build(self) -> Built:
        path = self.path()
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelConfigError(f"{path} is not a TorchScript file ({exc})") from exc
        return Built(module, "torchscript", Preprocessing((224, 224)))
