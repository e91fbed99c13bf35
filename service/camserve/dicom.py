"""Reading a DICOM file (PS3.10: "DICM" at byte 128) as a viewer shows it by default, with pydicom (`camserve[dicom]`).

A single-frame grayscale image gets its modality rescale (pydicom's `apply_modality_lut`) and its first VOI window
or VOI LUT (`apply_voi_lut`, index 0), then is scaled to [0, 1] by that window's output range; without a window,
from its smallest to its largest value, as viewers window such an image. MONOCHROME1 is inverted (its smallest
value is white). 8-bit colour (RGB, YBR) is read as RGB. Every refusal is a domain error naming the problem:
UnsupportedMediaError for what the service does not read (no pydicom, several frames, compressed pixel data whose
decoder is not installed, no pixel data, another photometric interpretation), PayloadTooLargeError above the pixel
limit (checked from the header, before any pixel is decoded), InvalidInputError for a file that cannot be parsed.
"""

from __future__ import annotations

import importlib
import io
import warnings
from types import ModuleType
from typing import Any

import numpy as np

from camserve.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaError

MEDIA_TYPE = "application/dicom"
_MAGIC_AT, _MAGIC = 128, b"DICM"
_GRAY = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def is_dicom(data: bytes) -> bool:
    """Whether `data` is a DICOM file: the "DICM" prefix after the 128-byte preamble."""
    return data[_MAGIC_AT : _MAGIC_AT + len(_MAGIC)] == _MAGIC


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the DICOM header, no pixel decoded; None when it cannot be read (`decode` then says
    why)."""
    try:
        dataset = _read(_pydicom(), data, pixels=False)
        return int(dataset.Columns), int(dataset.Rows)
    except Exception:
        return None


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """A DICOM file -> float64 [H, W] gray in [0, 1] (windowed as a viewer shows it) or uint8 [H, W, 3] RGB.

    Refuses, before decoding any pixel, files of more than `max_pixels` (width x height) and everything the module
    docstring lists.
    """
    pydicom = _pydicom()
    dataset = _read(pydicom, data, pixels=True)
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip().upper()
    _check(pydicom, dataset, photometric, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about values that do not follow the standard
            pixels = dataset.pixel_array
            if photometric in _GRAY:
                return _windowed(pydicom, dataset, pixels, photometric)
    except MemoryError:
        raise PayloadTooLargeError("the DICOM image needs more memory to decode than is available") from None
    except Exception as exc:  # the decoders' and the LUTs' errors: truncated data, a bad window, a bad LUT...
        raise InvalidInputError(f"the DICOM pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise InvalidInputError(f"the DICOM colour image decoded to an unexpected {pixels.dtype} {pixels.shape}")
    return pixels


def _pydicom() -> ModuleType:
    """pydicom, or an UnsupportedMediaError saying how to install it."""
    try:
        importlib.import_module("pydicom.pixels")  # the decoders and LUTs, a subpackage pydicom does not import
        return importlib.import_module("pydicom")
    except ImportError:
        raise UnsupportedMediaError(
            "DICOM needs the optional package pydicom, which this server does not have; "
            "install it with: pip install 'camserve[dicom]'"
        ) from None


def _read(pydicom: ModuleType, data: bytes, pixels: bool) -> Any:
    """The parsed dataset (pixel data left encoded, or not read when `pixels` is false)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not pixels)
    except Exception as exc:  # InvalidDicomError, EOFError, struct.error, ValueError... from a corrupt file
        raise InvalidInputError(f"the DICOM file cannot be parsed ({type(exc).__name__}: {exc})") from None


def _check(pydicom: ModuleType, dataset: Any, photometric: str, max_pixels: int) -> None:
    """Refuse, from the header, what `decode` does not read or what is too large."""
    if not any(name in dataset for name in _PIXEL_DATA):
        modality = f" ({dataset.Modality})" if dataset.get("Modality") else ""
        raise UnsupportedMediaError(f"the DICOM file{modality} holds no image (no pixel data)")
    frames = _number(dataset.get("NumberOfFrames", 1), "Number of Frames")
    if frames > 1:
        raise UnsupportedMediaError(
            f"the DICOM file is multi-frame ({frames} frames); the service reads single-frame images: send one frame"
        )
    rows, columns = (_number(dataset.get(name), name) for name in ("Rows", "Columns"))
    if rows < 1 or columns < 1:
        raise InvalidInputError(f"the DICOM image has an invalid size {columns}x{rows}")
    if rows * columns > max_pixels:
        raise PayloadTooLargeError(
            f"image is {columns}x{rows} = {rows * columns / 1e6:.1f} megapixels, above the limit of "
            f"{max_pixels / 1e6:.1f} megapixels"
        )
    colour = _number(dataset.get("SamplesPerPixel", 1), "Samples per Pixel") == 3
    if photometric not in _GRAY and not (colour and _number(dataset.get("BitsAllocated"), "Bits Allocated") == 8):
        raise UnsupportedMediaError(
            f"DICOM images with Photometric Interpretation {photometric or '(none)'} are not supported; send "
            "MONOCHROME1, MONOCHROME2 or 8-bit colour (RGB, YBR)"
        )
    if "PixelData" in dataset:
        _check_decoder(pydicom, dataset)


def _check_decoder(pydicom: ModuleType, dataset: Any) -> None:
    """Refuse pixel data whose transfer syntax has no decoder installed, naming the packages that would decode it."""
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        raise InvalidInputError("the DICOM file has no Transfer Syntax UID, so its pixel data cannot be read")
    try:
        decoder = pydicom.pixels.get_decoder(syntax)
    except NotImplementedError:
        raise UnsupportedMediaError(f"DICOM pixel data in transfer syntax {syntax} cannot be decoded") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise UnsupportedMediaError(
            f"the DICOM pixel data is compressed as {syntax.name}, and no decoder for it is installed on this "
            f"server (any one of: {missing}); send it uncompressed"
        )


def _windowed(pydicom: ModuleType, dataset: Any, pixels: np.ndarray, photometric: str) -> np.ndarray:
    """Stored gray values -> [0, 1]: modality rescale, the first VOI window or LUT, its output range; MONOCHROME1
    inverted."""
    values = pydicom.pixels.apply_modality_lut(pixels, dataset)
    windowed = pydicom.pixels.apply_voi_lut(values, dataset, index=0)
    low, high = _output_range(pydicom, dataset, windowed)
    unit = np.zeros(windowed.shape, dtype=np.float64)
    if high > low:
        unit = np.clip((windowed.astype(np.float64) - low) / (high - low), 0.0, 1.0)
    return 1.0 - unit if photometric == "MONOCHROME1" else unit


def _output_range(pydicom: ModuleType, dataset: Any, windowed: np.ndarray) -> tuple[float, float]:
    """What black and white are after `apply_voi_lut`: 0 and 2**bits - 1 for a VOI LUT (its descriptor's bits per
    entry), the window's y_min and y_max for a window (where it sends -inf and +inf), else the image's own extremes
    (there was no window)."""
    lut = (dataset.get("VOILUTSequence") or [None])[0]
    if lut is not None and lut.get("LUTDescriptor") is not None and lut.get("LUTData") is not None:
        return 0.0, float(2 ** int(lut.LUTDescriptor[2]) - 1)  # the one apply_voi_lut prefers
    ends = pydicom.pixels.apply_voi_lut(np.array([-np.inf, np.inf]), dataset, index=0)
    if np.isfinite(ends).all():
        return float(ends[0]), float(ends[1])
    return (float(windowed.min()), float(windowed.max())) if windowed.size else (0.0, 0.0)


def _number(value: object, name: str) -> int:
    """A header value as an int, or an InvalidInputError naming the element."""
    try:
        return int(value)  # type: ignore[call-overload]  # IS, US or a str from a lax file
    except (TypeError, ValueError):
        raise InvalidInputError(f"the DICOM header's {name} is missing or not a number ({value!r})") from None
