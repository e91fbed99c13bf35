"""How an image becomes a model input: size, channels, normalization and resampling filter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from camserve.models.errors import ModelConfigError

Interpolation = Literal["bilinear", "bicubic"]
INTERPOLATIONS: tuple[Interpolation, ...] = ("bilinear", "bicubic")
#: Input channels the service feeds: 3 (RGB) or 1 (luminance).
CHANNELS: tuple[int, ...] = (1, 3)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """The WHOLE image is resized to `input_size` ([height, width], no crop) with `interpolation`
    (antialiased), converted to `channels` channels (3: RGB; 1: luminance), scaled to [0, 1] and normalized as
    (x - mean) / std.

    `mean` and `std` end up with one value per channel: three values given for one channel (a source's RGB
    statistics) are averaged into one, one value given for three channels is repeated. A channel count other than
    1 or 3, or any other number of values, is a ModelConfigError.
    """

    input_size: tuple[int, int]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    channels: int = 3

    def __post_init__(self) -> None:
        if self.channels not in CHANNELS:
            raise ModelConfigError(f"the model takes {self.channels} input channels; the service feeds 1 or 3")
        object.__setattr__(self, "mean", _per_channel("mean", self.mean, self.channels))
        object.__setattr__(self, "std", _per_channel("std", self.std, self.channels))

    def overridden(
        self,
        input_size: tuple[int, int] | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        interpolation: str | None = None,
        channels: int | None = None,
    ) -> Preprocessing:
        """These defaults with the values the models file sets. The resampling filter must be one we implement,
        and a `mean` or `std` the file gives must have one value per channel (the defaults are adapted)."""
        resolved_channels = channels or self.channels
        for name, given in (("mean", mean), ("std", std)):
            if given is not None and len(given) != resolved_channels:
                raise ModelConfigError(
                    f"`{name}` has {len(given)} values but the model takes {resolved_channels} input channel(s); "
                    f"give {resolved_channels}"
                )
        resolved = Preprocessing(
            input_size=input_size or self.input_size,
            mean=mean or self.mean,
            std=std or self.std,
            interpolation=interpolation or self.interpolation,
            channels=resolved_channels,
        )
        if resolved.interpolation not in INTERPOLATIONS:
            raise ModelConfigError(
                f"the model's preprocessing asks for {resolved.interpolation!r} resampling, which the service does "
                f"not implement; set `interpolation` to one of {', '.join(INTERPOLATIONS)} in the models file"
            )
        return resolved


def _per_channel(name: str, values: Sequence[float], channels: int) -> tuple[float, ...]:
    """`values` as `channels` floats: as they are, three averaged into one, or one repeated three times."""
    floats = tuple(float(v) for v in values)
    if len(floats) == channels:
        return floats
    if len(floats) == 3 and channels == 1:
        return (sum(floats) / 3,)
    if len(floats) == 1 and channels == 3:
        return floats * 3
    raise ModelConfigError(f"`{name}` has {len(floats)} values; a {channels}-channel input needs {channels}")
