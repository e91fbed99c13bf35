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

from camserve.errors import InvalidParameterError

COLORMAPS: tuple[str, ...] = ("jet", "turbo", "viridis", "inferno", "magma")
OVERLAY_FORMATS: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}  # -> media type
MAX_PICTURE_SIDE = 8192
JPEG_QUALITY = 90
WEBP_QUALITY = 85


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
    scaled = np.subtract(values, low, dtype=np.float32)  # one buffer, updated in place: 512 x 512 in ~1 ms less
    scaled /= high - low
    np.clip(scaled, 0.0, 1.0, out=scaled)
    scaled *= np.float32(255.0)
    return np.rint(scaled, out=scaled).astype(np.uint8)


@lru_cache(maxsize=8)
def _colormap_array(name: str) -> np.ndarray:
    return _colormap_table(name, "cpu").numpy()


def overlay_image(pixels: np.ndarray, heatmap: np.ndarray, colormap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """uint8 image [H, W, 3] (RGB) or [H, W, 1] (gray, as RGB with three equal channels) and uint8 heatmap [H, W]
    -> uint8 [H, W, 3] overlay, as `blend(colorize(...))`."""
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


def check_overlay_format(name: str) -> str:
    """Return the overlay format or raise InvalidParameterError naming `overlay_format`."""
    if name not in OVERLAY_FORMATS:
        raise InvalidParameterError(f"unknown overlay_format {name!r}; use one of: {', '.join(OVERLAY_FORMATS)}")
    return name


def picture_size(size: str | int, image: tuple[int, int], model: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the pictures for a parsed `size` (camserve.options): the image's (`original`), the model
    input's (`model`), or the image's with its longer side capped at `size` pixels, aspect ratio kept (never
    enlarged)."""
    if size == "original":
        return image
    if size == "model":
        return model
    height, width = image
    longer = max(height, width)
    if longer <= int(size):
        return image
    scale = int(size) / longer
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_pixels(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, C] (C 3 or 1) -> [height, width, C] (PIL bilinear, antialiased when shrinking)."""
    height, width = size
    if pixels.shape[:2] == (height, width):
        return pixels
    planes = pixels[:, :, 0] if pixels.shape[2] == 1 else pixels
    resized = np.asarray(
        Image.fromarray(np.ascontiguousarray(planes)).resize((width, height), Image.Resampling.BILINEAR)
    )
    return resized.reshape(height, width, pixels.shape[2])


def encode_picture(pixels: np.ndarray, fmt: str = "png", compress_level: int = 1) -> bytes:
    """Encode a uint8 array [H, W] or [H, W, 3] as `png` (lossless), `jpeg` or `webp` (lossy)."""
    if fmt == "png":
        return encode_png(pixels, compress_level)
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if check_overlay_format(fmt) == "jpeg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, format="WEBP", quality=WEBP_QUALITY, method=0)
    return buffer.getvalue()
