"""Gradient scaling for float16 backward passes (loss scaling, as torch.amp.GradScaler does it).

float16 flushes magnitudes below 2**-24 to zero, and the gradient of one logit at early layers or at
the input (guided backpropagation) is often that small. Back-propagating 2**k instead of 1 lifts every
gradient by 2**k (the backward is linear, and guided backprop's gates are positively homogeneous);
dividing the float32 result by 2**k is exact, which Grad-CAM++ needs: its weights are not
scale-invariant. A scale that overflows somewhere gives inf/nan, and the pass is retried at a lower
scale. bfloat16 and float32 have float32's exponent range and need no scaling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

#: The first scale tried in float16: gradients of a logit rarely exceed 1, so up to 65504 / 2**12 = 16 fit.
FLOAT16_SCALE = 2.0**12
#: Each retry after an overflow divides the scale by this, down to 1 (no scaling).
BACKOFF = 2.0**4


def check_scale(scale: float) -> float:
    """`scale` if it is a power of two >= 1 (so that unscaling is exact), else ValueError."""
    mantissa, _ = math.frexp(scale)
    if not (math.isfinite(scale) and scale >= 1 and mantissa == 0.5):
        raise ValueError(f"gradient scale must be a power of two >= 1, got {scale!r}")
    return float(scale)


def default_scale(dtype: torch.dtype | None) -> float:
    """FLOAT16_SCALE when the backward runs in float16, else 1."""
    return FLOAT16_SCALE if dtype == torch.float16 else 1.0


def scales(first: float) -> list[float]:
    """The scales to try in order: `first`, then divided by BACKOFF while above 1, ending at 1."""
    out = [check_scale(first)]
    while out[-1] > 1:
        out.append(max(out[-1] / BACKOFF, 1.0))
    return out


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """True when no tensor holds inf or nan (one device-to-host sync for all of them)."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
