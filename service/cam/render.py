"""Turning raw maps into pictures: normalization, resizing, colormaps, overlays, PNG bytes.

Everything but PNG encoding runs in torch on the maps' device.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from service.errors import InvalidParameterError

COLORMAPS: tuple[str, ...] = ("jet", "turbo", "viridis", "inferno", "magma")


def minmax_normalize(maps: Tensor) -> Tensor:
    """Scale each map of [N, h, w] to [0, 1]; a constant map (e.g. all zeros) becomes all zeros."""
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    scaled = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, 1.0), 0.0)
    return scaled.view_as(maps)


def resize_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize [N, h, w] maps to size (height, width); antialiased when shrinking."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    shrinking = size[0] < maps.shape[-2] or size[1] < maps.shape[-1]
    resized = F.interpolate(
        maps.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False, antialias=shrinking
    )
    return resized.squeeze(1)


def heatmaps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Raw [N, h, w] maps -> [N, H, W] in [0, 1] at `size` (resize first, then normalize)."""
    return minmax_normalize(resize_maps(maps, size))


@lru_cache(maxsize=32)
def _colormap_table(name: str, device: str) -> Tensor:
    import matplotlib

    table = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
    return torch.tensor(table, dtype=torch.float32, device=device)


def check_colormap(name: str) -> str:
    """Return the colormap name or raise InvalidParameterError listing the supported ones."""
    if name not in COLORMAPS:
        raise InvalidParameterError(f"unknown colormap {name!r}; use one of: {', '.join(COLORMAPS)}")
    return name


def colorize(heat: Tensor, colormap: str = "jet") -> Tensor:
    """[N, H, W] maps in [0, 1] -> [N, 3, H, W] RGB in [0, 1] through a 256-entry colormap."""
    table = _colormap_table(check_colormap(colormap), str(heat.device))
    index = (heat.clamp(0, 1) * 255).round().long()
    return table[index].permute(0, 3, 1, 2)


def blend(images: Tensor, colors: Tensor, alpha: float = 0.5) -> Tensor:
    """Alpha-blend colorized maps over RGB images, both [N, 3, H, W] in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise InvalidParameterError(f"alpha must be between 0 and 1, got {alpha}")
    return (1.0 - alpha) * images + alpha * colors


def to_uint8(values: Tensor) -> Tensor:
    """[0, 1] floats -> uint8 with rounding."""
    return (values.clamp(0, 1) * 255).round().to(torch.uint8)


def encode_png(pixels: Tensor, compress_level: int = 1) -> bytes:
    """Encode a uint8 [H, W] (grayscale) or [3, H, W] (RGB) tensor as PNG bytes."""
    array = pixels.detach().cpu().numpy()
    if array.ndim == 3:
        array = np.ascontiguousarray(array.transpose(1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
