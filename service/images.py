"""Decoding untrusted image bytes safely, and preprocessing them for a model.

Limits are checked before full decoding (a decompression bomb costs nothing); every failure becomes a
domain error with a message that names the problem.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaError

SUPPORTED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})
SUPPORTED_MEDIA_TYPES: frozenset[str] = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/png",
        "image/webp",
        "image/bmp",
        "image/x-bmp",
        "image/x-ms-bmp",
        "image/gif",
        "image/tiff",
        "image/tif",
    }
)
_NEUTRAL_MEDIA_TYPES = {"", "application/octet-stream", "image/*"}


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000


@dataclass(frozen=True)
class DecodedImage:
    """RGB pixels as uint8 [3, H, W] on the CPU, after EXIF orientation."""

    pixels: torch.Tensor
    width: int
    height: int
    format: str


def check_media_type(content_type: str | None) -> None:
    """Refuse a declared media type we do not read (no declaration, octet-stream and image/* pass)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media in _NEUTRAL_MEDIA_TYPES or media in SUPPORTED_MEDIA_TYPES:
        return
    raise UnsupportedMediaError(f"unsupported image type {media!r}; send JPEG, PNG, WebP, BMP, GIF or TIFF")


def decode_image(
    data: bytes, limits: ImageLimits = ImageLimits(), device: torch.device | str | None = None
) -> DecodedImage:
    """Bytes -> RGB uint8 tensor, refusing oversized, unsupported or broken images.

    With a CUDA `device`, baseline JPEGs without EXIF rotation decode on the GPU (nvJPEG through
    torchvision); anything else, or any GPU failure, takes the CPU path.
    """
    if not data:
        raise InvalidInputError("empty image: the payload has no bytes")
    if len(data) > limits.max_bytes:
        raise PayloadTooLargeError(f"image is {len(data)} bytes, above the limit of {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidInputError("not a recognized image format (corrupt data or not an image)") from None
    except Image.DecompressionBombError as exc:  # PIL refuses > 2 x MAX_IMAGE_PIXELS at open time
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)) / 1e6:.1f} megapixels" if found else "too many pixels"
        raise PayloadTooLargeError(
            f"image is {size}, above the limit of {limits.max_pixels / 1e6:.1f} megapixels"
        ) from None
    except Exception as exc:
        raise InvalidInputError(f"the image cannot be read: {exc}") from None
    with image:
        fmt = image.format or "unknown"
        if fmt not in SUPPORTED_FORMATS:
            raise UnsupportedMediaError(f"{fmt} images are not supported; send JPEG, PNG, WebP, BMP, GIF or TIFF")
        width, height = image.size
        if width < 1 or height < 1:
            raise InvalidInputError(f"image has an invalid size {width}x{height}")
        if width * height > limits.max_pixels:
            raise PayloadTooLargeError(
                f"image is {width}x{height} = {width * height / 1e6:.1f} megapixels, above the limit of "
                f"{limits.max_pixels / 1e6:.1f} megapixels"
            )
        if device is not None and torch.device(device).type == "cuda" and fmt == "JPEG":
            on_gpu = _decode_jpeg_cuda(data, image, torch.device(device))
            if on_gpu is not None:
                return DecodedImage(pixels=on_gpu, width=width, height=height, format=fmt)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.seek(0)
                image.load()
                rgb = _to_rgb(ImageOps.exif_transpose(image))
                array = np.asarray(rgb, dtype=np.uint8)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise PayloadTooLargeError(f"image refused as a decompression bomb: {exc}") from None
        except (OSError, SyntaxError) as exc:
            message = str(exc)
            if "truncated" in message.lower() or "broken" in message.lower():
                raise InvalidInputError(f"the image data is truncated or corrupt ({message})") from None
            raise InvalidInputError(f"the {fmt} image is corrupt: {message}") from None
        except Exception as exc:
            raise InvalidInputError(f"the {fmt} image cannot be decoded: {exc}") from None
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    return DecodedImage(pixels=pixels, width=array.shape[1], height=array.shape[0], format=fmt)


def _decode_jpeg_cuda(data: bytes, header: Image.Image, device: torch.device) -> torch.Tensor | None:
    """GPU decode of an RGB/grayscale JPEG with no EXIF rotation; None means: use the CPU path."""
    if header.mode not in ("RGB", "L") or header.getexif().get(0x0112, 1) != 1:
        return None
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        pixels = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except Exception:
        return None
    if tuple(pixels.shape) != (3, header.size[1], header.size[0]):
        return None
    return pixels


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto white, 16-bit scaled to 8-bit."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or values.max() > 255 else 255.0
        if mode == "F":
            peak = max(float(values.max()), 1.0) if values.max() > 1 else 1.0
        gray = np.clip(np.round(values / peak * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(
    images: Sequence[torch.Tensor],
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 [3, H, W] images -> normalized float [B, 3, h, w]: the whole image resized (no crop)."""
    device = torch.device(device)
    mean_t = torch.tensor(mean, dtype=dtype, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=dtype, device=device).view(1, 3, 1, 1)
    batch = []
    for pixels in images:
        x = pixels.to(device, non_blocking=True).unsqueeze(0).to(dtype).div_(255.0)
        if tuple(x.shape[-2:]) != tuple(size):
            shrinking = x.shape[-2] > size[0] or x.shape[-1] > size[1]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
        batch.append(x)
    return (torch.cat(batch).clamp_(0.0, 1.0) - mean_t) / std_t
