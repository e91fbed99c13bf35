"""Turning raw maps into pictures: normalization, resizing, colormaps, overlays, PNG bytes.

Two implementations of the same steps: torch functions on the maps' device (`heatmaps`, `colorize`,
`blend`, `to_uint8`) for code that already runs torch, and numpy/PIL functions (`heatmap_image`,
`overlay_image`) that the service runs on its encoding threads, where torch's parallel ops must not run.
They agree to within one grey level.
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


def heatmap_image(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One raw map [h, w] -> uint8 heatmap [H, W] at `size` (height, width), as `to_uint8(heatmaps(...))`.

    Bilinear resize (antialiased when shrinking) with PIL in float, then min-max to [0, 255]; a constant
    map gives all zeros. numpy and PIL only.
    """
    height, width = int(size[0]), int(size[1])
    values = np.ascontiguousarray(cam, dtype=np.float32)
    if values.shape != (height, width):
        values = np.asarray(Image.fromarray(values).resize((width, height), Image.Resampling.BILINEAR))
    low, high = values.min(), values.max()
    if not high > low:
        return np.zeros((height, width), dtype=np.uint8)
    scaled = (values - low) / (high - low)
    return np.rint(np.clip(scaled, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


@lru_cache(maxsize=8)
def _colormap_array(name: str) -> np.ndarray:
    return _colormap_table(name, "cpu").numpy()


def overlay_image(pixels: np.ndarray, heatmap: np.ndarray, colormap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """uint8 RGB image [H, W, 3] and uint8 heatmap [H, W] -> uint8 [H, W, 3] overlay, as `blend(colorize(...))`."""
    if not 0.0 <= alpha <= 1.0:
        raise InvalidParameterError(f"alpha must be between 0 and 1, got {alpha}")
    colors = _colormap_array(check_colormap(colormap))[heatmap]
    image = pixels.astype(np.float32) / np.float32(255.0)
    blended = np.float32(1.0 - alpha) * image + np.float32(alpha) * colors
    return np.rint(np.clip(blended, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def encode_png(pixels: Tensor | np.ndarray, compress_level: int = 1) -> bytes:
    """Encode uint8 pixels as PNG bytes: a tensor [H, W] or [3, H, W], or an array [H, W] or [H, W, 3]."""
    if isinstance(pixels, Tensor):
        array = pixels.detach().cpu().numpy()
        if array.ndim == 3:
            array = np.ascontiguousarray(array.transpose(1, 2, 0))
    else:
        array = np.ascontiguousarray(pixels)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
