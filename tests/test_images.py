"""Decoding untrusted images (formats, modes, EXIF orientation, limits, broken data) and preprocessing."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
import torchvision.io
from PIL import Image, ImageFile

from camserve.errors import CamserveError, InvalidInputError, PayloadTooLargeError, UnsupportedMediaError
from camserve.images import (
    SUPPORTED_FORMATS,
    SUPPORTED_MEDIA_TYPES,
    DecodedImage,
    EncodedJpeg,
    ImageLimits,
    check_media_type,
    decode_image,
    decode_jpeg_batch_cuda,
    jpeg_for_gpu,
    preprocess,
    resize_for_model,
    resize_to_model,
    upload,
)

RED, GREEN, BLUE, YELLOW = (220, 20, 30), (10, 200, 40), (20, 40, 210), (240, 230, 20)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def quadrants(width: int = 64, height: int = 48) -> np.ndarray:
    """HWC uint8: red top-left, green top-right, blue bottom-left, yellow bottom-right."""
    array = np.empty((height, width, 3), dtype=np.uint8)
    array[: height // 2, : width // 2] = RED
    array[: height // 2, width // 2 :] = GREEN
    array[height // 2 :, : width // 2] = BLUE
    array[height // 2 :, width // 2 :] = YELLOW
    return array


def chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def assert_well_formed(decoded: DecodedImage) -> None:
    pixels = decoded.pixels
    assert isinstance(decoded, DecodedImage)
    assert pixels.dtype == torch.uint8 and pixels.device.type == "cpu" and pixels.is_contiguous()
    assert tuple(pixels.shape) == (3, decoded.height, decoded.width)


def max_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


# -- formats ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params", "tolerance"),
    [
        ("JPEG", {"quality": 95}, 12),  # lossy: colour edges blur a little; centres are checked
        ("PNG", {}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("WEBP", {"quality": 90}, 12),
        ("BMP", {}, 0),
        ("GIF", {}, 0),  # four colours fit the palette exactly
        ("TIFF", {}, 0),
        ("TIFF", {"compression": "tiff_lzw"}, 0),
    ],
)
def test_every_supported_format_decodes_to_the_right_rgb_pixels(fmt, params, tolerance):
    original = quadrants()
    decoded = decode_image(encode(Image.fromarray(original), fmt, **params))
    assert_well_formed(decoded)
    assert decoded.format == fmt and (decoded.width, decoded.height) == (64, 48)
    expected = chw(original)
    if tolerance == 0:
        assert torch.equal(decoded.pixels, expected)
    else:
        for row, col in [(12, 16), (12, 48), (36, 16), (36, 48)]:  # the centre of each quadrant
            assert max_difference(decoded.pixels[:, row, col], expected[:, row, col]) <= tolerance


def test_supported_sets_name_what_the_service_reads():
    assert frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"}) == SUPPORTED_FORMATS
    for media in ("image/jpeg", "image/jpg", "image/png", "image/webp", "image/bmp", "image/x-ms-bmp"):
        assert media in SUPPORTED_MEDIA_TYPES
    assert {"image/gif", "image/tiff"} <= SUPPORTED_MEDIA_TYPES
    assert "image/svg+xml" not in SUPPORTED_MEDIA_TYPES


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("GIF", {"duration": 100, "loop": 0}), ("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})],
)
@pytest.mark.parametrize("first", [RED, BLUE])
def test_multi_frame_images_give_their_first_frame(fmt, params, first):
    second = BLUE if first == RED else RED
    frames = [Image.new("RGB", (20, 10), first), Image.new("RGB", (20, 10), second)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
    assert Image.open(io.BytesIO(data)).n_frames == 2  # really an animation / multi-page file
    decoded = decode_image(data)
    assert_well_formed(decoded)
    assert decoded.format == fmt
    assert decoded.pixels[:, 5, 10].tolist() == list(first)


def test_multi_picture_jpeg_reads_as_jpeg_with_its_primary_picture():
    frames = [Image.new("RGB", (32, 16), RED), Image.new("RGB", (32, 16), BLUE)]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:], quality=95)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    decoded = decode_image(data)
    assert decoded.format == "JPEG" and (decoded.width, decoded.height) == (32, 16)
    assert max_difference(decoded.pixels[:, 8, 16], torch.tensor(RED)) <= 6


# -- EXIF orientation -------------------------------------------------------------------------------------


def jpeg_with_orientation(array: np.ndarray, orientation: int | None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    return encode(Image.fromarray(array), "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize(
    ("orientation", "rotate"),
    [(None, 0), (1, 0), (3, 2), (6, -1), (8, 1)],  # np.rot90 turns: 6 is 90° clockwise, 8 counter-clockwise
)
def test_exif_orientation_is_applied(orientation, rotate):
    stored = np.zeros((24, 48, 3), dtype=np.uint8)
    stored[:8, :8] = 255  # white block in the stored top-left corner
    stored[:8, -8:] = (255, 0, 0)  # red block in the stored top-right corner
    decoded = decode_image(jpeg_with_orientation(stored, orientation))
    assert_well_formed(decoded)
    expected = np.rot90(stored, k=rotate)
    assert (decoded.height, decoded.width) == expected.shape[:2]
    assert (decoded.pixels.int() - chw(expected).int()).abs().float().mean() < 3
    white = {0: (0, 0), 2: (-1, -1), -1: (0, -1), 1: (-1, 0)}[rotate]  # where the white corner must land
    assert decoded.pixels[:, white[0], white[1]].min() > 200
    assert decoded.pixels[:, 0 if white[0] else -1, 0 if white[1] else -1].max() < 40  # the opposite corner


def test_exif_orientation_6_moves_a_known_corner_pixel():
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:6, :6] = (0, 255, 0)
    decoded = decode_image(jpeg_with_orientation(stored, 6))
    assert (decoded.width, decoded.height) == (20, 40)  # width and height swap
    assert decoded.pixels[1, 0, 19] > 200 and decoded.pixels[1, 0, 0] < 40  # top-left went to the top-right


# -- modes ------------------------------------------------------------------------------------------------


def test_rgba_transparency_is_composited_onto_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((1, 1), (10, 20, 30, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))  # half-transparent black
    for data in (encode(rgba, "PNG"), encode(rgba, "WEBP", lossless=True), encode(rgba, "TIFF")):
        decoded = decode_image(data)
        assert_well_formed(decoded)
        assert decoded.pixels[:, 0, 0].tolist() == [255, 255, 255]
        assert decoded.pixels[:, 1, 1].tolist() == [10, 20, 30]
        assert all(abs(v - 127) <= 1 for v in decoded.pixels[:, 2, 2].tolist())


def test_grayscale_with_alpha_is_composited_onto_white():
    la = Image.new("LA", (3, 3), (0, 0))
    la.putpixel((1, 1), (90, 255))
    decoded = decode_image(encode(la, "PNG"))
    assert decoded.pixels[:, 0, 0].tolist() == [255, 255, 255]
    assert decoded.pixels[:, 1, 1].tolist() == [90, 90, 90]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_white(fmt):
    palette = Image.new("P", (6, 6), 0)
    palette.putpalette([0, 0, 0, *RED, *BLUE] + [0] * (253 * 3))
    palette.paste(1, (0, 0, 3, 6))  # left half red
    palette.paste(2, (3, 0, 5, 6))  # then blue, with a last column of index 0 (transparent black)
    decoded = decode_image(encode(palette, fmt, transparency=0))
    assert decoded.pixels[:, 2, 1].tolist() == list(RED)
    assert decoded.pixels[:, 2, 4].tolist() == list(BLUE)
    assert decoded.pixels[:, 2, 5].tolist() == [255, 255, 255]


def test_palette_without_transparency_keeps_its_colours():
    palette = Image.fromarray(quadrants()).quantize(colors=4)
    decoded = decode_image(encode(palette, "PNG"))
    assert torch.equal(decoded.pixels, chw(quadrants()))


def test_rgb_png_with_a_transparent_colour_key():
    rgb = Image.fromarray(quadrants())
    decoded = decode_image(encode(rgb, "PNG", transparency=GREEN))
    assert decoded.pixels[:, 5, 50].tolist() == [255, 255, 255]  # the keyed colour
    assert decoded.pixels[:, 5, 5].tolist() == list(RED)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(fmt):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.paste((255, 255, 0, 0), (0, 4, 8, 8))  # pure blue bottom half
    decoded = decode_image(encode(cmyk, fmt, **({"quality": 95} if fmt == "JPEG" else {})))
    assert_well_formed(decoded)
    assert max_difference(decoded.pixels[:, 1, 4], torch.tensor([255, 0, 0])) <= 8
    assert max_difference(decoded.pixels[:, 6, 4], torch.tensor([0, 0, 255])) <= 8


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP"])
def test_grayscale_becomes_three_equal_channels(fmt):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))  # 8 x 64 ramp
    decoded = decode_image(encode(Image.fromarray(gray, mode="L"), fmt))
    assert_well_formed(decoded)
    assert torch.equal(decoded.pixels[0], decoded.pixels[1]) and torch.equal(decoded.pixels[1], decoded.pixels[2])
    assert max_difference(decoded.pixels[0], torch.from_numpy(gray)) <= (3 if fmt == "JPEG" else 0)


def test_bilevel_image_becomes_black_and_white():
    bits = Image.new("1", (8, 2), 0)
    bits.paste(1, (4, 0, 8, 2))
    decoded = decode_image(encode(bits, "PNG"))
    assert decoded.pixels[:, 0, 0].tolist() == [0, 0, 0]
    assert decoded.pixels[:, 1, 7].tolist() == [255, 255, 255]


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_is_scaled_not_clipped(fmt):
    values = np.array([[0, 257 * 100, 65535], [257 * 20, 40000, 1000]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    data = encode(image, fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")  # really stored as 16-bit
    decoded = decode_image(data)
    assert_well_formed(decoded)
    # 40000 -> 155.6 -> 156 (a clip would give 255); 1000 -> 3.9 -> 4 (a clip would give 255 too)
    assert decoded.pixels[0].tolist() == [[0, 100, 255], [20, 156, 4]]
    assert torch.equal(decoded.pixels[0], decoded.pixels[2])


def test_32_bit_float_tiff_in_zero_to_one_is_scaled():
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    decoded = decode_image(encode(Image.fromarray(values, mode="F"), "TIFF"))
    assert decoded.pixels[1].tolist() == [[0, 128, 255]]


@pytest.mark.parametrize("value", [-5.0, 70_000.0])
def test_a_constant_tiff_outside_every_range_decodes_to_black_without_warnings(value):
    constant = Image.fromarray(np.full((4, 6), value, dtype=np.float32), mode="F")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's 0 / 0 would warn
        decoded = decode_image(encode(constant, "TIFF"))
    assert decoded.pixels.sum().item() == 0 and (decoded.width, decoded.height) == (6, 4)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_one_pixel_image(fmt):
    decoded = decode_image(encode(Image.new("RGB", (1, 1), (200, 100, 50)), fmt))
    assert_well_formed(decoded)
    assert (decoded.width, decoded.height) == (1, 1)
    assert max_difference(decoded.pixels.flatten(), torch.tensor([200, 100, 50])) <= (8 if fmt in "JPEG WEBP" else 0)


# -- limits -----------------------------------------------------------------------------------------------


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_bomb(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height RGB pixels, then a tiny IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def bmp_header_bomb(width: int, height: int) -> bytes:
    """A 24-bit BMP whose header claims width x height pixels, with almost no pixel data."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    pixels = b"\x00" * 16
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + len(pixels), 0, 0, 14 + len(info)) + info + pixels


def test_png_header_bomb_is_refused_fast_before_decoding():
    bomb = png_header_bomb(30000, 30000)
    assert len(bomb) < 200
    max_pixels_before, filters_before = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    started = time.perf_counter()
    with pytest.raises(PayloadTooLargeError) as caught:
        decode_image(bomb)
    assert time.perf_counter() - started < 0.5
    assert str(caught.value) == "image is 30000x30000 = 900.0 megapixels, above the limit of 40.0 megapixels"
    assert max_pixels_before == Image.MAX_IMAGE_PIXELS and list(warnings.filters) == filters_before


@pytest.mark.parametrize(
    ("bomb", "limits", "message"),
    [
        # below PIL's own bomb threshold: refused by our check alone
        (png_header_bomb(8000, 8000), ImageLimits(), "8000x8000 = 64.0 megapixels, above the limit of 40.0"),
        (png_header_bomb(3000, 3000), ImageLimits(max_pixels=4_000_000), "3000x3000 = 9.0 megapixels"),
        (bmp_header_bomb(20000, 20000), ImageLimits(), "20000x20000 = 400.0 megapixels"),
        (bmp_header_bomb(7000, 7000), ImageLimits(), "7000x7000 = 49.0 megapixels"),
    ],
)
def test_header_bombs_are_refused_with_their_size(bomb, limits, message):
    started = time.perf_counter()
    with pytest.raises(PayloadTooLargeError, match=message):
        decode_image(bomb, limits)
    assert time.perf_counter() - started < 0.5


def test_pixel_limit_is_inclusive():
    data = encode(Image.new("RGB", (100, 40)), "PNG")
    assert decode_image(data, ImageLimits(max_pixels=4000)).width == 100
    with pytest.raises(PayloadTooLargeError, match=r"100x40 = 0.0 megapixels"):
        decode_image(data, ImageLimits(max_pixels=3999))


def test_pil_bomb_error_becomes_payload_too_large(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL now refuses more than 2000 pixels itself
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(PayloadTooLargeError, match=r"100x100 = 0.0 megapixels, above the decoder's safety limit"):
        decode_image(data)  # our own limit (40 megapixels) would allow it


def test_pil_bomb_warning_does_not_escape_when_our_limit_allows(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10000 pixels: PIL warns but does not refuse
    data = encode(Image.new("RGB", (100, 100), RED), "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = decode_image(data)
    assert decoded.pixels[:, 50, 50].tolist() == list(RED)


def test_byte_limit_is_checked_before_anything_else():
    with pytest.raises(PayloadTooLargeError, match="image is 12 bytes, above the limit of 10 bytes"):
        decode_image(b"not an image", ImageLimits(max_bytes=10))  # garbage, but too big comes first
    data = encode(Image.new("RGB", (4, 4)), "PNG")
    assert decode_image(data, ImageLimits(max_bytes=len(data))).width == 4  # the limit itself is allowed
    with pytest.raises(PayloadTooLargeError, match=f"{len(data)} bytes, above the limit of {len(data) - 1} bytes"):
        decode_image(data, ImageLimits(max_bytes=len(data) - 1))


# -- broken data ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_data_is_an_invalid_input(fmt, fraction, chelsea):
    data = encode(Image.fromarray(chelsea), fmt)
    with pytest.raises(InvalidInputError, match="truncated or corrupt"):
        decode_image(data[: int(len(data) * fraction)])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_data_is_refused_even_if_pil_was_told_to_accept_it(fmt, chelsea, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(Image.fromarray(chelsea), fmt)
    with pytest.raises(InvalidInputError, match="truncated"):
        decode_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_random_and_empty_bytes():
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidInputError, match="not a recognized image format"):
        decode_image(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(InvalidInputError, match="empty image"):
        decode_image(b"")


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,  # PNG signature, garbage chunks
        b"\xff\xd8\xff\xe0" + b"\x13" * 60,  # JPEG SOI, garbage marker
        b"GIF89a" + b"\xff" * 20,
        b"BM" + b"\xff" * 60,  # BMP with an absurd header
        b"II*\x00" + b"\xff" * 30,  # TIFF with a bad IFD offset
        b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 12,
        png_header_bomb(0, 10),  # zero width
    ],
)
def test_broken_headers_are_invalid_input(data):
    with pytest.raises(InvalidInputError):
        decode_image(data)


def test_mutated_files_only_ever_raise_domain_errors(chelsea):
    """Flipped bytes anywhere in real files: a picture or a CamserveError, never another exception."""
    rng = np.random.default_rng(1234)
    photo = Image.fromarray(chelsea[:96, :128])
    originals = [encode(photo, fmt) for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")]
    outcomes = {"decoded": 0, "refused": 0}
    for original in originals:
        for _ in range(40):
            mutated = bytearray(original)
            for position in rng.integers(0, len(original), size=int(rng.integers(1, 6))):
                mutated[position] = int(rng.integers(0, 256))
            try:
                decoded = decode_image(bytes(mutated), ImageLimits(max_pixels=4_000_000))
            except CamserveError:
                outcomes["refused"] += 1
            else:
                assert_well_formed(decoded)
                outcomes["decoded"] += 1
    assert outcomes["decoded"] > 0 and outcomes["refused"] > 0


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX"])
def test_formats_we_do_not_read_are_unsupported_media(fmt):
    data = encode(Image.new("RGB", (16, 16), RED), fmt)
    with pytest.raises(UnsupportedMediaError) as caught:
        decode_image(data)
    message = str(caught.value)
    assert message.startswith(f"{fmt} images are not supported")
    assert all(name in message for name in SUPPORTED_FORMATS)


def test_declared_media_types():
    for ok in (
        None,
        "",
        "image/png",
        "image/jpg",
        "image/x-ms-bmp",
        "image/jpeg; charset=binary",
        "application/octet-stream",
        "IMAGE/WEBP",
        "image/*",
    ):
        check_media_type(ok)
    for refused in ("image/svg+xml", "image/heic", "image/avif", "text/plain"):
        with pytest.raises(UnsupportedMediaError, match=refused.replace("+", r"\+")):
            check_media_type(refused)


# -- real photos ------------------------------------------------------------------------------------------


def test_real_photo_jpeg_round_trip(chelsea):
    decoded = decode_image(encode(Image.fromarray(chelsea), "JPEG", quality=95))
    assert_well_formed(decoded)
    assert decoded.format == "JPEG" and (decoded.width, decoded.height) == (451, 300)
    assert decoded.pixels.shape == (3, 300, 451)
    assert (decoded.pixels.int() - chw(chelsea).int()).abs().float().mean() < 2.0


def test_real_photo_png_round_trip_is_exact(coffee):
    decoded = decode_image(encode(Image.fromarray(coffee), "PNG"))
    assert (decoded.width, decoded.height) == (600, 400)
    assert torch.equal(decoded.pixels, chw(coffee))


# -- preprocessing ----------------------------------------------------------------------------------------


def test_preprocess_shape_dtype_and_constant_colour():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    constant = torch.empty((3, 10, 20), dtype=torch.uint8)
    constant[0], constant[1], constant[2] = 51, 128, 250
    x = preprocess([constant, constant[:, :7, :3].contiguous()], (32, 24), mean, std)
    assert x.shape == (2, 3, 32, 24) and x.dtype == torch.float32 and x.device.type == "cpu"
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip((51, 128, 250), mean, std, strict=True)])
    torch.testing.assert_close(x, expected.view(1, 3, 1, 1).expand(2, 3, 32, 24), rtol=0, atol=1e-6)


def test_preprocess_resizes_the_whole_image_without_cropping():
    half = np.zeros((50, 100, 3), dtype=np.uint8)
    half[:, :50] = (255, 0, 0)
    half[:, 50:] = (0, 0, 255)
    half[:, :10] = (0, 255, 0)  # a thin green strip at the far left: a centre crop would lose it
    x = preprocess([chw(half)], (32, 32), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert x[0, 1, :, 0].min() > 0.99  # the strip survives, squeezed to ~3 columns
    assert x[0, 0, :, 5:15].min() > 0.99 and x[0, 2, :, :15].max() < 0.01  # left half red
    assert x[0, 2, :, 17:].min() > 0.99 and x[0, 0, :, 17:].max() < 0.01  # right half blue
    assert x[0, 1, :, 5:].max() < 0.01


@pytest.mark.parametrize(
    ("interpolation", "pil_filter"),
    [("bilinear", Image.Resampling.BILINEAR), ("bicubic", Image.Resampling.BICUBIC)],
)
def test_preprocess_matches_an_antialiased_pil_reference(chelsea, interpolation, pil_filter):
    size = (120, 200)  # height, width: not square, to catch an h/w swap
    x = preprocess([chw(chelsea)], size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation=interpolation)
    reference = np.asarray(Image.fromarray(chelsea).resize((size[1], size[0]), pil_filter))
    got = x[0].permute(1, 2, 0).numpy() * 255
    assert got.shape == reference.shape
    assert np.abs(got - reference).mean() < 0.5 and np.abs(got - reference).max() < 3


def test_bicubic_and_bilinear_differ_and_unknown_filters_are_refused(chelsea):
    image = chw(chelsea)
    bilinear = preprocess([image], (120, 200), (0, 0, 0), (1, 1, 1))
    bicubic = preprocess([image], (120, 200), (0, 0, 0), (1, 1, 1), interpolation="bicubic")
    assert (bicubic - bilinear).abs().max() > 0.02  # the filter is really applied (sharper edges)
    for call in (
        lambda: preprocess([image], (8, 8), (0, 0, 0), (1, 1, 1), interpolation="nearest"),
        lambda: resize_for_model(image, (8, 8), "lanczos"),
    ):
        with pytest.raises(ValueError, match="interpolation must be one of bilinear, bicubic"):
            call()


def test_preprocess_dtype_device_and_input_checks():
    image = torch.full((3, 16, 16), 200, dtype=torch.uint8)
    half = preprocess(
        [image], (8, 8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), device=torch.device("cpu"), dtype=torch.bfloat16
    )
    assert half.dtype == torch.bfloat16 and half.device == torch.device("cpu")
    torch.testing.assert_close(half.float(), torch.full((1, 3, 8, 8), (200 / 255 - 0.5) / 0.5), atol=1e-2, rtol=0)
    same_size = preprocess([image], (16, 16), (0, 0, 0), (1, 1, 1), device="cpu")
    torch.testing.assert_close(same_size, torch.full((1, 3, 16, 16), 200 / 255))
    with pytest.raises(ValueError, match="uint8"):
        preprocess([image.float()], (8, 8), (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="uint8"):
        preprocess([image.double()], (16, 16), (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="at least one image"):
        preprocess([], (8, 8), (0, 0, 0), (1, 1, 1))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(224, 224), (120, 200), (600, 900), (300, 451), (150, 800)])
def test_resize_for_model_matches_preprocess_resizing(chelsea, size, interpolation):
    """PIL in float (decode threads) and torch's antialiased filter (torch thread) give the same input."""
    image = chw(chelsea)
    resized = resize_for_model(image, size, interpolation)
    assert resized.dtype == torch.float32 and resized.shape == (3, *size)
    assert resized.min() >= 0.0 and resized.max() <= 1.0
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    via_torch = preprocess([image], size, mean, std, interpolation=interpolation)
    via_pil = preprocess([resized], size, mean, std)
    torch.testing.assert_close(via_pil, via_torch, rtol=0, atol=1e-4)


def test_resize_for_model_input_checks_and_same_size():
    image = torch.full((3, 16, 16), 51, dtype=torch.uint8)
    torch.testing.assert_close(resize_for_model(image, (16, 16)), torch.full((3, 16, 16), 0.2))
    for bad in (image.float(), image[0], torch.zeros(4, 8, 8, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="uint8"):
            resize_for_model(bad, (8, 8))
    with pytest.raises(ValueError, match=r"float32 \[3, 8, 8\]"):
        preprocess([resize_for_model(image, (16, 16))], (8, 8), (0, 0, 0), (1, 1, 1))


# -- GPU JPEG decoding ------------------------------------------------------------------------------------


def test_cuda_jpeg_batch_declines_without_cuda():
    data = encode(Image.new("RGB", (8, 8), RED), "JPEG")
    assert decode_jpeg_batch_cuda([data], torch.device("cpu")) is None
    if not torch.cuda.is_available():
        assert decode_jpeg_batch_cuda([data], torch.device("cuda")) is None


@pytest.fixture
def fake_nvjpeg(monkeypatch):
    """Pretend CUDA and nvJPEG exist: decode_jpeg decodes on the CPU, marks pixels, and records its calls."""
    calls: list[int] = []
    real = torchvision.io.decode_image

    def fake_decode_jpeg(inputs, mode=None, device="cpu", apply_exif_orientation=False):
        assert torch.device(device).type == "cuda" and mode == torchvision.io.ImageReadMode.RGB
        calls.append(len(inputs))
        return [real(data, mode=torchvision.io.ImageReadMode.RGB) for data in inputs]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", fake_decode_jpeg)
    return calls


def test_cuda_jpeg_batch_routes_only_unrotated_jpegs(fake_nvjpeg):
    device = torch.device("cuda")
    plain = [encode(Image.fromarray(quadrants(64, 48)), "JPEG", quality=95), encode(Image.new("L", (9, 7), 80), "JPEG")]
    decoded = decode_jpeg_batch_cuda(plain, device)
    assert decoded is not None and fake_nvjpeg == [2]  # one batched call
    assert [tuple(p.shape) for p in decoded] == [(3, 48, 64), (3, 7, 9)]
    assert max_difference(decoded[0][:, 12, 16], torch.tensor(RED)) <= 12
    rotated = jpeg_with_orientation(quadrants(), 6)
    cmyk = encode(Image.new("CMYK", (8, 8)), "JPEG")
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    for odd in (rotated, cmyk, png, b"garbage", b""):
        assert decode_jpeg_batch_cuda([plain[0], odd], device) is None
    assert decode_jpeg_batch_cuda(plain, device, ImageLimits(max_pixels=1000)) is None  # 64 x 48 is too many
    assert fake_nvjpeg == [2]  # none of those reached the decoder


def test_cuda_jpeg_batch_falls_back_when_the_decoder_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("nvjpeg unavailable")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", broken)
    data = encode(Image.new("RGB", (8, 8), RED), "JPEG")
    assert decode_jpeg_batch_cuda([data], torch.device("cuda")) is None


def test_jpeg_for_gpu_takes_only_unrotated_jpegs_within_the_limits(fake_nvjpeg):
    """The header decides; nothing is decoded (the fake decoder is never called)."""
    plain = encode(Image.fromarray(quadrants()), "JPEG", quality=95)
    jpeg = jpeg_for_gpu(plain)
    assert jpeg is not None and (jpeg.width, jpeg.height) == (64, 48) and jpeg.data is plain
    gray = encode(Image.new("L", (9, 7), 80), "JPEG")
    assert jpeg_for_gpu(gray) == EncodedJpeg(gray, 9, 7)
    for other in (
        jpeg_with_orientation(quadrants(), 8),
        encode(Image.new("CMYK", (8, 8)), "JPEG"),
        encode(Image.fromarray(quadrants()), "PNG"),
        b"garbage",
        b"",
    ):
        assert jpeg_for_gpu(other) is None
    assert jpeg_for_gpu(plain, ImageLimits(max_pixels=64 * 48 - 1)) is None
    assert jpeg_for_gpu(plain, ImageLimits(max_bytes=len(plain) - 1)) is None
    assert fake_nvjpeg == []


def test_decode_image_never_uses_the_gpu(fake_nvjpeg):
    decoded = decode_image(encode(Image.fromarray(quadrants()), "JPEG", quality=95))
    assert fake_nvjpeg == [] and decoded.pixels.device.type == "cpu" and (decoded.width, decoded.height) == (64, 48)


def test_resize_to_model_matches_preprocess(chelsea):
    pixels = chw(chelsea)
    resized = resize_to_model(pixels, (224, 224), "bicubic")
    assert resized.dtype == torch.float32 and tuple(resized.shape) == (3, 224, 224)
    assert float(resized.min()) >= 0.0 and float(resized.max()) <= 1.0
    direct = preprocess([pixels], (224, 224), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), interpolation="bicubic")
    via = preprocess([resized], (224, 224), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), interpolation="bicubic")
    torch.testing.assert_close(via, direct, atol=0, rtol=0)
    assert torch.equal(resize_to_model(pixels, (300, 451)), pixels.float() / 255)  # same size: only scaled


def test_upload_stages_host_images_in_one_buffer_per_dtype(monkeypatch, chelsea):
    """On CUDA, the host images go through one pinned buffer per dtype and one copy each. Simulated with the
    "meta" device as the target and `pin_memory` recorded instead of honoured (no CUDA here)."""
    pinned: list[torch.Tensor] = []
    real_empty = torch.empty

    def empty(*size, dtype=None, pin_memory=False, **kwargs):
        buffer = real_empty(*size, dtype=dtype, **kwargs)
        if pin_memory:
            pinned.append(buffer)
        return buffer

    monkeypatch.setattr(torch, "empty", empty)
    meta = torch.device("meta")
    images = [
        chw(chelsea),
        torch.rand(3, 8, 8),
        chw(chelsea[:10, :20]),
        torch.rand(3, 8, 8),
        torch.rand(3, 2, 2, device=meta),
    ]
    moved = upload(images, meta, pin=True)
    assert [b.dtype for b in pinned] == [torch.uint8, torch.float32]
    torch.testing.assert_close(pinned[0], torch.cat([images[0].flatten(), images[2].flatten()]), atol=0, rtol=0)
    torch.testing.assert_close(pinned[1], torch.cat([images[1].flatten(), images[3].flatten()]), atol=0, rtol=0)
    assert [(m.device, m.dtype, m.shape) for m in moved] == [(meta, i.dtype, i.shape) for i in images]
    assert moved[4] is images[4]  # already there: not staged
    pinned.clear()
    cpu = upload(images[:4], torch.device("cpu"), pin=False)
    assert pinned == [] and all(a is b for a, b in zip(cpu, images[:4], strict=True))  # nothing moves on the CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_jpeg_decode_matches_cpu(chelsea, coffee):
    datas = [encode(Image.fromarray(photo), "JPEG", quality=90) for photo in (chelsea, coffee)]
    on_gpu = decode_jpeg_batch_cuda(datas, torch.device("cuda"))
    assert on_gpu is not None
    for data, pixels in zip(datas, on_gpu, strict=True):
        cpu = decode_image(data).pixels
        assert pixels.device.type == "cuda" and pixels.shape == cpu.shape and pixels.dtype == torch.uint8
        difference = (pixels.cpu().int() - cpu.int()).abs().float()
        assert difference.mean() < 1.0 and difference.max() <= 16  # IDCT implementations differ slightly
    resized = resize_to_model(on_gpu[0], (224, 224))
    assert resized.device.type == "cuda"
    torch.testing.assert_close(
        resized.cpu(), resize_to_model(decode_image(datas[0]).pixels, (224, 224)), atol=0.07, rtol=0
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_preprocess_on_gpu_matches_cpu(chelsea):
    cpu = preprocess([chw(chelsea)], (224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    mixed = [chw(chelsea), resize_to_model(chw(chelsea), (224, 224)), chw(chelsea).cuda()]
    gpu = preprocess(mixed, (224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), device="cuda")  # pinned staging
    assert gpu.device.type == "cuda" and gpu.shape[0] == 3
    for row in gpu.cpu():
        torch.testing.assert_close(row.unsqueeze(0), cpu, atol=1e-4, rtol=0)


def test_our_pixel_limit_above_pils_own_is_the_one_that_counts(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL alone would refuse more than 2000 pixels
    data = encode(Image.new("RGB", (100, 100), RED), "PNG")
    limits = ImageLimits(max_pixels=20_000)
    limits.apply_to_pil()  # as the service does at start
    assert decode_image(data, limits).pixels[:, 50, 50].tolist() == list(RED)
    assert Image.MAX_IMAGE_PIXELS == 20_000
    ImageLimits(max_pixels=500).apply_to_pil()  # a lower limit of ours never lowers PIL's
    assert Image.MAX_IMAGE_PIXELS == 20_000
