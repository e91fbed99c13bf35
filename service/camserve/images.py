"""Decoding untrusted image bytes safely, and preprocessing them for a model.

Every limit is checked before pixels are decoded (a decompression bomb costs a header parse), and every
failure becomes one of the domain errors of `camserve.errors` with a message that names the problem:
`InvalidInputError` for data that cannot be read, `PayloadTooLargeError` for byte or pixel limits,
`UnsupportedMediaError` for formats the service does not read. Images come in the channels their model takes:
RGB, or one channel of luminance; for a one-channel model, 16-bit pictures and DICOM keep their precision.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from camserve import dicom
from camserve.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaError

logger = logging.getLogger(__name__)

SUPPORTED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
"""PIL format names that `decode_image` reads."""

SUPPORTED_MEDIA_TYPES: frozenset[str] = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/png",
        "image/x-png",
        "image/webp",
        "image/bmp",
        "image/x-bmp",
        "image/x-ms-bmp",
        "image/gif",
        "image/tiff",
        "image/tif",
        "image/x-tiff",
        dicom.MEDIA_TYPE,
    }
)
"""Declared media types `check_media_type` accepts (besides the neutral ones)."""

# Declarations that say nothing about the format: the bytes decide.
_NEUTRAL_MEDIA_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream", "image/*"})
# PIL names for variants of a supported format; reported under the supported name.
_FORMAT_ALIASES = {"MPO": "JPEG"}  # multi-picture JPEG written by many phone cameras; frame 0 is the photo
_SUPPORTED_TEXT = "JPEG, PNG, WebP, BMP, GIF, TIFF or DICOM"
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S")
_PRECISE_MODES = (*_SIXTEEN_BIT_MODES, "I", "F")  # more than 8 bits per pixel: one-channel models get floats
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost: encoded bytes, and decoded pixels (width x height)."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000

    def apply_to_pil(self) -> None:
        """PIL refuses images above 2 x its own MAX_IMAGE_PIXELS (~179 MP) by itself; ours is the limit that counts
        (checked from the header before decoding), so the service raises PIL's to it at start (never lowers it)."""
        if (Image.MAX_IMAGE_PIXELS or 0) and self.max_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = self.max_pixels


@dataclass(frozen=True)
class DecodedImage:
    """Pixels as a contiguous CPU tensor [C, H, W] (C: the channels asked for, 3 RGB or 1 luminance), after EXIF
    orientation: uint8, or float32 in [0, 1] for a one-channel picture of more than 8 bits (16-bit PNG or TIFF,
    DICOM)."""

    pixels: torch.Tensor
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG left encoded for the GPU decoder: its bytes passed every limit and `jpeg_for_gpu`'s checks.

    The worker decodes the JPEGs of a batch together on the torch thread (`decode_jpeg_batch_cuda`), so nvJPEG
    never runs beside the model's kernels on another thread.
    """

    data: bytes
    width: int
    height: int


def check_media_type(content_type: str | None) -> None:
    """Raise UnsupportedMediaError if a declared content type is not one we read.

    No declaration, application/octet-stream and image/* pass (the bytes decide); parameters such as
    `; charset=...` and letter case are ignored.
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in _NEUTRAL_MEDIA_TYPES or media in SUPPORTED_MEDIA_TYPES:
        return
    raise UnsupportedMediaError(
        f"unsupported media type {media!r}; send {_SUPPORTED_TEXT} (image/jpeg, image/png, image/webp, "
        f"image/bmp, image/gif, image/tiff, {dicom.MEDIA_TYPE})"
    )


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), channels: int = 3) -> DecodedImage:
    """Bytes -> `DecodedImage` with `channels` channels on the CPU, refusing oversized, unsupported or broken images.

    Multi-frame images give their first frame; EXIF orientation is applied; transparency is composited onto white.
    A DICOM file ("DICM" at byte 128) is windowed as a viewer shows it (`camserve.dicom`). 3 channels: RGB uint8,
    gray replicated, 16-bit pictures and DICOM scaled to 8 bits. 1 channel: luminance, uint8 for 8-bit pictures (as
    PIL's "L"), float32 in [0, 1] at full precision for 16-bit ones (0..65535 to 0..1) and DICOM.
    """
    if channels not in (1, 3):
        raise ValueError(f"decode_image gives 1 or 3 channels, not {channels}")
    if not data:
        raise InvalidInputError("empty image: the payload has no bytes")
    if len(data) > limits.max_bytes:
        raise PayloadTooLargeError(f"image is {len(data)} bytes, above the limit of {limits.max_bytes} bytes")
    if dicom.is_dicom(data):
        return _from_dicom(dicom.decode(data, limits.max_pixels), channels)
    _refuse_truncated_images()
    image = _open(data, limits)
    with image:
        fmt = _format_of(image)
        _check_size(image, limits)
        decoded = _decode_pixels(image, fmt, limits, channels)
    height, width = int(decoded.shape[0]), int(decoded.shape[1])
    if decoded.ndim == 2:  # one channel, uint8 or float32
        return DecodedImage(pixels=torch.from_numpy(decoded[None].copy()), width=width, height=height, format=fmt)
    chw = np.empty((3, height, width), dtype=np.uint8)
    chw[...] = decoded.transpose(2, 0, 1)  # one copy into a fresh, writable, contiguous array
    return DecodedImage(pixels=torch.from_numpy(chw), width=width, height=height, format=fmt)


def eight_bit(pixels: torch.Tensor) -> torch.Tensor:
    """The uint8 picture of `DecodedImage.pixels` (what overlays are drawn on): uint8 as it is, float32 in [0, 1]
    rounded to 0..255."""
    if pixels.dtype == torch.uint8:
        return pixels
    return torch.from_numpy(_unit_to_8_bit(pixels.numpy()))


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image's header alone, nothing decoded; None when the header cannot be read
    (`decode_image` then says what is wrong)."""
    if dicom.is_dicom(data):
        return dicom.header_size(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Exception:  # DecompressionBombError, UnidentifiedImageError, a plugin's parse error...
        return _header_size(data)
    return int(width), int(height)


def jpeg_for_gpu(data: bytes, limits: ImageLimits = ImageLimits()) -> EncodedJpeg | None:
    """`EncodedJpeg` when nvJPEG decodes these bytes to the picture the CPU path gives (a plain RGB or grayscale
    JPEG within `limits`, EXIF orientation 1 or absent), from the header alone; None otherwise (`decode_image`
    then decodes on the CPU, or names what is wrong)."""
    if not data or len(data) > limits.max_bytes:
        return None
    size = _gpu_jpeg_size(data)
    if size is None or size[0] * size[1] > limits.max_pixels:
        return None
    return EncodedJpeg(data=data, width=size[0], height=size[1])


def decode_jpeg_batch_cuda(
    datas: Sequence[bytes], device: torch.device, limits: ImageLimits = ImageLimits()
) -> list[torch.Tensor] | None:
    """Decode JPEG bytes on a CUDA device with nvJPEG (torchvision), in one call, as RGB uint8 [3, H, W] tensors.

    Call it on the thread that runs the model (torchvision's decoder does not order its output memory after
    other threads' kernels: pytorch/vision#9606). Returns None, so the caller falls back to `decode_image` on
    the CPU, when CUDA or nvJPEG is unavailable, when any item fails `jpeg_for_gpu`'s checks (without
    decoding), or when any decode fails or gives an unexpected size.
    """
    device = torch.device(device)
    if device.type != "cuda" or not datas or not torch.cuda.is_available():
        return None
    sizes: list[tuple[int, int]] = []
    for data in datas:
        jpeg = jpeg_for_gpu(data, limits)
        if jpeg is None:
            return None
        sizes.append((jpeg.width, jpeg.height))
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        encoded = [torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()) for data in datas]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except Exception as exc:  # no nvJPEG, a stream nvJPEG rejects, out of memory: the CPU path decides
        logger.debug("GPU JPEG decoding failed, falling back to the CPU: %s", exc)
        return None
    if isinstance(decoded, torch.Tensor):
        decoded = [decoded]
    if len(decoded) != len(datas):
        return None
    for pixels, (width, height) in zip(decoded, sizes, strict=True):
        if tuple(pixels.shape) != (3, height, width) or pixels.dtype != torch.uint8:
            return None
    return [pixels.contiguous() for pixels in decoded]


def resize_for_model(pixels: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 [C, H, W] CPU image (C 3 or 1) -> float32 [C, size[0], size[1]] in [0, 1], resized as `preprocess`
    resizes.

    Bilinear or bicubic with antialias (PIL's resampling in float mode: within 1e-5 of torch's `antialias=True`,
    whose bicubic kernel is PIL's, a = -0.5), computed with PIL and numpy only, so it can run on any thread
    without starting torch's parallel workers: the service calls it where it decodes, off the one thread that
    runs the model.
    """
    _check_planes(pixels, torch.uint8, "resize_for_model")
    resized = _resize_planes(pixels.numpy(), size, interpolation)
    return torch.from_numpy(np.clip(resized / np.float32(255.0), 0.0, 1.0, dtype=np.float32))


def resize_float_for_model(
    pixels: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear"
) -> torch.Tensor:
    """float32 [C, H, W] CPU image in [0, 1] (a 16-bit or DICOM picture; C 3 or 1) -> float32 [C, size[0], size[1]]
    in [0, 1], resampled in float as `resize_for_model` (never through 8 bits)."""
    _check_planes(pixels, torch.float32, "resize_float_for_model")
    resized = _resize_planes(pixels.numpy(), size, interpolation)
    return torch.from_numpy(np.clip(resized, 0.0, 1.0, dtype=np.float32))


def resize_to_model(pixels: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 [C, H, W] image on any device -> float32 [C, size[0], size[1]] in [0, 1] on the same device.

    The whole image is resized (no crop, aspect ratio not kept) with antialias, as `preprocess` resizes;
    the worker calls it right after decoding on the GPU, so full-size pixels never wait in a queue.
    """
    _pil_filter(interpolation)  # refuses a filter that `resize_for_model` cannot match
    height, width = int(size[0]), int(size[1])
    x = pixels.unsqueeze(0).to(torch.float32).div_(255.0)
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode=interpolation, align_corners=False, antialias=True)
    return x.clamp_(0.0, 1.0).squeeze(0)


def preprocess(
    images: Sequence[torch.Tensor],
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Images -> `dtype` [B, C, size[0], size[1]] on `device`, normalized as (x - mean) / std; C, the channels, is
    the number of `mean` and `std` values (3 or 1).

    Each image is either uint8 [C, H, W], whose WHOLE image is resized to `size` (`resize_to_model`;
    `interpolation` "bilinear" or "bicubic", with antialias), or float32 [C, size[0], size[1]] in [0, 1] from
    `resize_for_model`, `resize_float_for_model` or `resize_to_model`. Images move to `device` first (on CUDA: the
    CPU ones staged in one pinned buffer per dtype, one upload each), so resizing runs there; the arithmetic is
    float32 and the result is cast to `dtype`.
    """
    if len(images) == 0:
        raise ValueError("preprocess needs at least one image")
    channels = len(mean)
    if channels not in (1, 3) or len(std) != channels:
        raise ValueError(f"mean and std need one value per channel (3 or 1), got {len(mean)} and {len(std)}")
    _pil_filter(interpolation)  # refuses a filter that `resize_for_model` cannot match
    height, width = int(size[0]), int(size[1])
    device = torch.device(device)
    for i, pixels in enumerate(images):
        if pixels.dim() != 3 or pixels.shape[0] != channels:
            raise ValueError(f"images[{i}] must be [{channels}, H, W], got {pixels.dtype} {list(pixels.shape)}")
        at_size = pixels.dtype == torch.float32 and tuple(pixels.shape[-2:]) == (height, width)
        if not at_size and pixels.dtype != torch.uint8:
            raise ValueError(
                f"images[{i}] must be uint8 [{channels}, H, W] or float32 [{channels}, {height}, {width}], "
                f"got {pixels.dtype} {list(pixels.shape)}"
            )
    on_device = upload(images, device, pin=device.type == "cuda")
    batch = [x if x.dtype == torch.float32 else resize_to_model(x, (height, width), interpolation) for x in on_device]
    mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(1, channels, 1, 1).to(device)
    std_t = torch.tensor([float(s) for s in std], dtype=torch.float32).view(1, channels, 1, 1).to(device)
    out = (torch.stack(batch).clamp_(0.0, 1.0) - mean_t) / std_t
    return out.to(dtype)


def upload(images: Sequence[torch.Tensor], device: torch.device, pin: bool) -> list[torch.Tensor]:
    """`images` on `device`. Without `pin`, each moves as it is (a no-op for those already there). With `pin`,
    the others are copied into one pinned host buffer per dtype, which moves in one asynchronous copy and
    is split on the device."""
    moved: list[torch.Tensor | None] = [x if _is_on(x, device) else None for x in images]
    if not pin:
        return [x if x is not None else images[i].to(device) for i, x in enumerate(moved)]
    for i, x in enumerate(images):
        if moved[i] is None and x.is_pinned():  # staged ahead (`stage_pinned`): moves as it is, asynchronously
            moved[i] = x.to(device, non_blocking=True)
    for dtype in dict.fromkeys(images[i].dtype for i, x in enumerate(moved) if x is None):
        rows = [i for i, x in enumerate(moved) if x is None and images[i].dtype == dtype]
        total = sum(images[i].numel() for i in rows)
        staging = torch.empty(total, dtype=dtype, pin_memory=True)
        start = 0
        for i in rows:
            count = images[i].numel()
            staging[start : start + count].view(images[i].shape).copy_(images[i])
            start += count
        flat = staging.to(device, non_blocking=True)  # the caching host allocator keeps `staging` until it is read
        start = 0
        for i in rows:
            count = images[i].numel()
            moved[i] = flat[start : start + count].view(images[i].shape)
            start += count
    return [x for x in moved if x is not None]


def stage_pinned(images: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """CPU images copied into pinned host memory (others, and None, as they are): the host half of `upload`,
    done ahead for a batch that waits while another computes, so its upload is one asynchronous copy."""
    return [x.pin_memory() if x is not None and x.device.type == "cpu" and not x.is_pinned() else x for x in images]


def _is_on(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether `tensor` is on `device` ("cuda" means the current CUDA device, as `Tensor.to` reads it)."""
    if tensor.device.type != device.type:
        return False
    if device.index is None and device.type == "cuda":
        return tensor.device.index == torch.cuda.current_device()
    return device.index is None or tensor.device.index == device.index


# -- helpers -----------------------------------------------------------------------------------------------

_PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def _pil_filter(interpolation: str) -> Image.Resampling:
    """PIL's filter matching torch's antialiased `interpolation`; ValueError for one we do not implement."""
    try:
        return _PIL_FILTERS[interpolation]
    except KeyError:
        raise ValueError(f"interpolation must be one of {', '.join(_PIL_FILTERS)}, got {interpolation!r}") from None


def _check_planes(pixels: torch.Tensor, dtype: torch.dtype, caller: str) -> None:
    """ValueError unless `pixels` is a `dtype` [3, H, W] or [1, H, W] CPU image."""
    if pixels.dtype != dtype or pixels.dim() != 3 or pixels.shape[0] not in (1, 3) or pixels.device.type != "cpu":
        name = str(dtype).removeprefix("torch.")
        raise ValueError(
            f"{caller} needs a {name} [3, H, W] or [1, H, W] CPU image, got {pixels.dtype} {list(pixels.shape)}"
        )


def _resize_planes(planes: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """[C, H, W] uint8 or float32 planes -> float32 [C, size[0], size[1]], each resized by PIL in float mode."""
    resample = _pil_filter(interpolation)
    height, width = int(size[0]), int(size[1])
    if tuple(planes.shape[1:]) == (height, width):
        return planes.astype(np.float32)
    return np.stack(
        [np.asarray(Image.fromarray(plane).convert("F").resize((width, height), resample)) for plane in planes]
    )


def _from_dicom(picture: np.ndarray, channels: int) -> DecodedImage:
    """`dicom.decode`'s picture (float gray [H, W] in [0, 1], or uint8 RGB [H, W, 3]) with `channels` channels:
    gray is float32 for one channel and rounded to 8 bits then replicated for three; RGB stays uint8 (PIL's "L"
    for one channel)."""
    height, width = int(picture.shape[0]), int(picture.shape[1])
    if picture.ndim == 3 and channels == 3:
        planes = picture.transpose(2, 0, 1)
    elif picture.ndim == 3:
        planes = np.asarray(Image.fromarray(picture).convert("L"))[None]
    elif channels == 1:
        planes = picture.astype(np.float32)[None]
    else:
        planes = np.broadcast_to(_unit_to_8_bit(picture), (3, height, width))
    return DecodedImage(torch.from_numpy(np.array(planes, order="C")), width, height, "DICOM")


def _refuse_truncated_images() -> None:
    """Truncated data must be an error: undo a global LOAD_TRUNCATED_IMAGES = True set elsewhere."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was enabled; disabling it so truncated images are refused")
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels"


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    """Parse the header only (PIL opens lazily); map PIL's errors to domain errors."""
    try:
        with warnings.catch_warnings():
            # The pixel limit is ours (checked right after); PIL's warning threshold is not. PIL's warnings
            # about corrupt metadata in untrusted uploads would only fill the logs.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", module=r"PIL\.")
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidInputError(
            f"not a recognized image format ({len(data)} bytes that are corrupt or not an image); "
            f"send {_SUPPORTED_TEXT}"
        ) from None
    except Image.DecompressionBombError as exc:  # PIL refuses more than 2 x MAX_IMAGE_PIXELS while opening
        raise _bomb_error(exc, limits, _header_size(data)) from None
    except Exception as exc:  # OSError, SyntaxError, struct.error, ValueError... from a plugin's header parser
        raise InvalidInputError(f"the image header is truncated or corrupt ({type(exc).__name__}: {exc})") from None


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the header of a supported format, bypassing PIL's bomb check; None if unknown.

    Used where PIL itself refuses an image while opening it (to word the message, or to size the render budget).
    """
    prefix = data[:16]
    for fmt in sorted(SUPPORTED_FORMATS):
        entry = Image.OPEN.get(fmt)
        if entry is None:
            continue
        factory, accept = entry
        try:
            if accept is not None and not accept(prefix):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with factory(io.BytesIO(data), None) as header:
                    width, height = header.size
            return int(width), int(height)
        except Exception:
            continue
    return None


def _bomb_error(exc: Exception, limits: ImageLimits, size: tuple[int, int] | None = None) -> PayloadTooLargeError:
    """A PayloadTooLargeError for PIL's own decompression bomb refusal (`size` from the header, if known)."""
    found = _BOMB_PIXELS.search(str(exc))
    if size is not None:
        pixels, what = size[0] * size[1], f"{size[0]}x{size[1]} = {_megapixels(size[0] * size[1])}"
    elif found is not None:
        pixels = int(found.group(1))
        what = _megapixels(pixels)
    else:
        return PayloadTooLargeError(f"image refused as a decompression bomb: {exc}")
    if pixels > limits.max_pixels:
        return PayloadTooLargeError(f"image is {what}, above the limit of {_megapixels(limits.max_pixels)}")
    pil_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return PayloadTooLargeError(f"image is {what}, above the decoder's safety limit of {_megapixels(pil_limit)}")


def _format_of(image: Image.Image) -> str:
    fmt = image.format or "unknown"
    fmt = _FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in SUPPORTED_FORMATS:
        raise UnsupportedMediaError(
            f"{fmt} images are not supported; send {_SUPPORTED_TEXT} ({', '.join(sorted(SUPPORTED_FORMATS))})"
        )
    return fmt


def _check_size(image: Image.Image, limits: ImageLimits) -> tuple[int, int]:
    """The header's size, refused when empty or above the pixel limit; nothing is decoded yet."""
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidInputError(f"image has an invalid size {width}x{height}")
    if width * height > limits.max_pixels:
        raise PayloadTooLargeError(
            f"image is {width}x{height} = {_megapixels(width * height)}, above the limit of "
            f"{_megapixels(limits.max_pixels)}"
        )
    return width, height


def _exif_orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag (1 when absent), or None when the EXIF block cannot be parsed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about corrupt EXIF
            value = image.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value)
    except Exception:
        return None


def _gpu_decodable(image: Image.Image) -> bool:
    """A JPEG nvJPEG decodes to the same picture as the CPU path: RGB or grayscale, not rotated."""
    return image.format in ("JPEG", "MPO") and image.mode in ("RGB", "L") and _exif_orientation(image) == 1


def _gpu_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a JPEG that `_gpu_decodable` accepts; None for anything else."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as header:
                if not _gpu_decodable(header):
                    return None
                width, height = header.size
    except Exception:
        return None
    return (int(width), int(height)) if width >= 1 and height >= 1 else None


def _decode_pixels(image: Image.Image, fmt: str, limits: ImageLimits, channels: int) -> np.ndarray:
    """Decode the first frame, EXIF orientation applied -> uint8 [H, W, 3] RGB for 3 channels; for 1, float32
    [H, W] in [0, 1] from a picture of more than 8 bits, else uint8 [H, W] luminance."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"PIL\.")
            image.seek(0)
            image.load()
    except Image.DecompressionBombError as exc:  # e.g. a GIF frame larger than its logical screen
        raise _bomb_error(exc, limits) from None
    except MemoryError:
        raise PayloadTooLargeError(f"the {fmt} image needs more memory to decode than is available") from None
    except Exception as exc:  # OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error...
        raise InvalidInputError(f"the {fmt} image data is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    width, height = image.size
    if width * height > limits.max_pixels:  # loading a frame may enlarge the canvas
        raise PayloadTooLargeError(
            f"image is {width}x{height} = {_megapixels(width * height)}, above the limit of "
            f"{_megapixels(limits.max_pixels)}"
        )
    oriented = image
    if _exif_orientation(image) not in (1, None):
        try:
            oriented = ImageOps.exif_transpose(image)
        except Exception as exc:  # a malformed EXIF block: keep the stored orientation
            logger.debug("ignoring unusable EXIF orientation: %s", exc)
    try:
        if channels == 1 and oriented.mode in _PRECISE_MODES:
            return _to_unit(np.asarray(oriented), oriented.mode)
        rgb = _to_rgb(oriented)
        if channels == 1:
            return np.asarray(rgb if rgb.mode == "L" else rgb.convert("L"), dtype=np.uint8)
        hwc = np.asarray(rgb, dtype=np.uint8)
    except MemoryError:
        raise PayloadTooLargeError(f"the {fmt} image needs more memory to decode than is available") from None
    except Exception as exc:
        raise InvalidInputError(f"the {fmt} image (mode {oriented.mode}) cannot be converted to RGB: {exc}") from None
    if hwc.ndim != 3 or hwc.shape[2] != 3:
        raise InvalidInputError(f"the {fmt} image decoded to an unexpected shape {hwc.shape}")
    return hwc


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited onto white; 16-bit and float are scaled to 8 bits."""
    mode = image.mode
    if mode in _PRECISE_MODES:
        return Image.fromarray(_to_8_bit(np.asarray(image), mode)).convert("RGB")
    if mode in _ALPHA_MODES or image.has_transparency_data:  # alpha channel, or a transparent palette entry/colour
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image
    return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX...


def _to_8_bit(values: np.ndarray, mode: str) -> np.ndarray:
    """One-band 16-bit, 32-bit integer or float pixels -> uint8 grayscale, scaled rather than clipped, from the
    range `_value_range` reads (0..255 as it is)."""
    x = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    found = _value_range(x, mode)
    if found is None:  # one value outside every known range: nothing to stretch
        return np.zeros(x.shape, dtype=np.uint8)
    low, high = found
    scaled = x if (low, high) == (0.0, 255.0) else (x - low) / (high - low) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_unit(values: np.ndarray, mode: str) -> np.ndarray:
    """One-band 16-bit, 32-bit integer or float pixels -> float32 [0, 1], from the range `_value_range` reads (a
    16-bit picture: value / 65535)."""
    x = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    found = _value_range(x, mode)
    if found is None:
        return np.zeros(x.shape, dtype=np.float32)
    low, high = found
    return np.clip((x - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _unit_to_8_bit(values: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] -> uint8 0..255, rounded."""
    return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def _value_range(x: np.ndarray, mode: str) -> tuple[float, float] | None:
    """The values that are black and white in pixels `x` of `mode`. 16-bit modes: 0..65535. Mode "I" (32-bit) and
    "F" carry no declared range, so it is inferred: values within 0..1 (float only), 0..255 or 0..65535 are read as
    that range; anything wider from its minimum to its maximum; None for one value outside every known range."""
    if mode in _SIXTEEN_BIT_MODES:
        return 0.0, 65535.0
    low, high = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if low >= 0.0 and high <= 1.0 and mode == "F":
        return 0.0, 1.0
    if low >= 0.0 and high <= 255.0:
        return 0.0, 255.0
    if low >= 0.0 and high <= 65535.0:
        return 0.0, 65535.0
    return (low, high) if high > low else None
