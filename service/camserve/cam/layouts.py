"""Feature layouts: how a layer's output maps onto a [B, C, h, w] feature map.

CNN layers output `[B, C, h, w]` (NCHW). Swin, MaxViT blocks and ConvNeXt internals output channels-last
maps `[B, h, w, C]` (NHWC). Vision transformers output token sequences `[B, N, C]`: a few prefix tokens
(class, distillation, register tokens) followed by the patch grid in row-major order. Each layout is
read from the shapes a traced forward produced, given the model's input size; methods always see NCHW.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from camserve.cam.errors import UnknownLayerError

#: Most tokens before the patch grid that a token layout accepts (class + distillation + registers).
MAX_PREFIX_TOKENS = 16

LayoutKind = Literal["nchw", "nhwc", "tokens"]


@dataclass(frozen=True)
class FeatureLayout:
    """Where channels and the spatial grid sit in a layer's output."""

    kind: LayoutKind
    grid: tuple[int, int]
    prefix: int = 0

    def to_nchw(self, tensor: Tensor, layer: str = "") -> Tensor:
        """The same values as a [B, C, h, w] map (prefix tokens dropped); a view where possible."""
        if self.kind == "nchw":
            return tensor
        if self.kind == "nhwc":
            return tensor.permute(0, 3, 1, 2)
        height, width = self.grid
        batch, tokens, channels = tensor.shape
        if tokens != self.prefix + height * width:
            raise UnknownLayerError(
                f"layer {layer!r} outputs {tokens} tokens, expected {self.prefix} prefix tokens and a "
                f"{height}x{width} patch grid; send images of the model's input size"
            )
        return tensor[:, self.prefix :].reshape(batch, height, width, channels).permute(0, 3, 1, 2)

    @property
    def channel_dim(self) -> int:
        """The dimension of the layer's own output that holds its channels (1 in NCHW, the last otherwise)."""
        return 1 if self.kind == "nchw" else -1

    def channels(self, shape: Sequence[int]) -> int:
        """The channel count of an output of `shape` in this layout."""
        return int(shape[self.channel_dim])

    def check(self, shape: Sequence[int], layer: str) -> None:
        """Raise UnknownLayerError when an output of `shape` cannot have this layout."""
        rank = 3 if self.kind == "tokens" else 4
        if len(shape) != rank:
            raise UnknownLayerError(f"layer {layer!r} outputs {tuple(shape)}, expected a {self.describe()}")

    def describe(self) -> str:
        height, width = self.grid
        if self.kind == "nchw":
            return f"[B, C, {height}, {width}] feature map"
        if self.kind == "nhwc":
            return f"channels-last [B, {height}, {width}, C] feature map"
        return f"[B, {self.prefix} + {height}x{width}, C] token sequence"


def fits_input(grid: tuple[int, int], input_size: tuple[int, int]) -> bool:
    """True when `grid` is the input downsampled by one integer stride on both sides.

    Unpadded convolutions and pooling shrink a side a little below input / stride (AlexNet's 55 at
    stride 4 of 224, Inception's 35 at stride 8 of 299), so each side may fall short of it by up to 10 %
    or 2 cells; it may not exceed the ceiling. Attention matrices and other non-spatial 4-D tensors fail.
    """
    (h, w), (height, width) = grid, input_size
    if h < 1 or w < 1 or h * w < 2 or h > height or w > width:
        return False
    for stride in range(1, max(height, width) + 1):
        if _side_fits(h, height / stride) and _side_fits(w, width / stride):
            return True
    return False


def _side_fits(cells: int, exact: float) -> bool:
    return exact - max(2.0, 0.1 * exact) <= cells <= math.ceil(exact)


def detect_layout(
    shape: Sequence[int],
    batch: int,
    input_size: tuple[int, int],
    known_grids: Iterable[tuple[int, int]] = (),
) -> FeatureLayout | None:
    """The layout of an output of `shape` from a forward on `batch` images of `input_size`, or None.

    NCHW wins when both 4-D readings fit (the CNN convention). A token count is split into prefix and
    grid preferring grids seen elsewhere in the same forward (the patch embedding), then the smallest
    prefix whose remainder tiles the input's aspect ratio.
    """
    if len(shape) not in (3, 4) or shape[0] != batch:
        return None
    if len(shape) == 4:
        _, a, b, c = shape
        if fits_input((b, c), input_size):
            return FeatureLayout("nchw", (b, c))
        if fits_input((a, b), input_size):
            return FeatureLayout("nhwc", (a, b))
        return None
    _, tokens, channels = shape
    if channels < 2:
        return None
    grids = list(dict.fromkeys(known_grids))
    for candidates in (grids, None):
        for prefix in range(min(MAX_PREFIX_TOKENS, tokens - 2) + 1):
            grid = _grid_of(tokens - prefix, input_size, candidates)
            if grid is not None:
                return FeatureLayout("tokens", grid, prefix)
    return None


def _grid_of(
    count: int, input_size: tuple[int, int], candidates: list[tuple[int, int]] | None
) -> tuple[int, int] | None:
    """A grid of `count` cells: one of `candidates`, or (None) any that fits the input's aspect ratio."""
    if candidates is not None:
        return next((g for g in candidates if g[0] * g[1] == count), None)
    height, width = input_size
    approx = max(1, round((count * height / width) ** 0.5))
    for h in (approx - 1, approx, approx + 1):
        if h >= 1 and count % h == 0 and fits_input((h, count // h), input_size):
            return (h, count // h)
    return None
