"""How an image becomes a model input: size, normalization and resampling filter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from camserve.models.errors import ModelConfigError

Interpolation = Literal["bilinear", "bicubic"]
INTERPOLATIONS: tuple[Interpolation, ...] = ("bilinear", "bicubic")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """The WHOLE image is resized to `input_size` ([height, width], no crop) with `interpolation`
    (antialiased), scaled to [0, 1] and normalized as (x - mean) / std."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def overridden(
        self,
        input_size: tuple[int, int] | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        interpolation: str | None = None,
    ) -> Preprocessing:
        """These defaults with the values the models file sets; the resampling filter must be one we implement."""
        resolved = Preprocessing(
            input_size=input_size or self.input_size,
            mean=mean or self.mean,
            std=std or self.std,
            interpolation=interpolation or self.interpolation,
        )
        if resolved.interpolation not in INTERPOLATIONS:
            raise ModelConfigError(
                f"the model's preprocessing asks for {resolved.interpolation!r} resampling, which the service does "
                f"not implement; set `interpolation` to one of {', '.join(INTERPOLATIONS)} in the models file"
            )
        return resolved
