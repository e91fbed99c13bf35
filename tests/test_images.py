"""Decoding untrusted images: formats, modes, EXIF orientation, limits, broken data; preprocessing."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from service.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaError
from service.images import ImageLimits, check_media_type, decode_image, preprocess


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def solid(color=(200, 30, 60), size=(40, 30), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


@pytest.mark.parametrize(
    ("fmt", "params", "tolerance"),
    [("JPEG", {"quality": 95}, 4), ("PNG", {}, 0), ("WEBP", {"lossless": True}, 0), ("BMP", {}, 0), ("TIFF", {}, 0)],
)
def test_every_listed_format_decodes_to_rgb(fmt, params, tolerance):
    decoded = decode_image(encode(solid(), fmt, **params))
    assert decoded.format == fmt and (decoded.width, decoded.height) == (40, 30)
    assert decoded.pixels.shape == (3, 30, 40) and decoded.pixels.dtype == torch.uint8
    assert (decoded.pixels[:, 15, 20].int() - torch.tensor([200, 30, 60])).abs().max() <= tolerance


def test_animated_gif_gives_its_first_frame():
    frames = [solid((255, 0, 0)), solid((0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    decoded = decode_image(data)
    assert decoded.format == "GIF"
    assert decoded.pixels[:, 0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize(("orientation", "corner"), [(6, (0, -1)), (8, (-1, 0)), (3, (-1, -1))])
def test_exif_orientation_is_applied(orientation, corner):
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:6, :6] = [255, 255, 255]  # a white top-left corner in the stored pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_image(encode(Image.fromarray(array), "JPEG", quality=95, exif=exif.tobytes()))
    if orientation in (6, 8):
        assert (decoded.width, decoded.height) == (20, 40)
    else:
        assert (decoded.width, decoded.height) == (40, 20)
    row, col = corner
    assert decoded.pixels[:, row, col].min() > 200  # the white corner moved where the tag says
    assert decoded.pixels[:, 0, 0].max() < 60 or corner == (0, 0)


def test_rgba_is_composited_onto_white_and_palette_transparency_too():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (10, 20, 30, 255))
    decoded = decode_image(encode(rgba, "PNG"))
    assert decoded.pixels[:, 0, 0].tolist() == [255, 255, 255]
    assert decoded.pixels[:, 1, 1].tolist() == [10, 20, 30]
    palette = rgba.convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    decoded = decode_image(encode(palette, "PNG", transparency=palette.getpixel((0, 0))))
    assert decoded.pixels[:, 0, 0].tolist() == [255, 255, 255]


def test_cmyk_grayscale_and_16_bit_become_rgb():
    cmyk = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    assert cmyk.pixels[0, 4, 4] > 200 and cmyk.pixels[1, 4, 4] < 50  # pure red
    gray = decode_image(encode(Image.new("L", (8, 8), 77), "PNG"))
    assert gray.pixels[:, 3, 3].tolist() == [77, 77, 77]
    values = np.array([[0, 257 * 100], [65535, 257 * 20]], dtype=np.uint16)
    sixteen = decode_image(encode(Image.fromarray(values), "PNG"))
    assert sixteen.pixels[0].tolist() == [[0, 100], [255, 20]]


def test_one_pixel_image():
    decoded = decode_image(encode(solid((1, 2, 3), size=(1, 1)), "PNG"))
    assert decoded.pixels.shape == (3, 1, 1) and decoded.pixels.flatten().tolist() == [1, 2, 3]


def png_header_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_before_decoding():
    bomb = png_header_bomb(30000, 30000)
    assert len(bomb) < 200
    started = time.perf_counter()
    with pytest.raises(PayloadTooLargeError, match=r"900.0 megapixels, above the limit of 40.0 megapixels"):
        decode_image(bomb)
    assert time.perf_counter() - started < 0.5
    with pytest.raises(PayloadTooLargeError, match=r"image is 3000x3000 = 9.0 megapixels, above the limit of 4.0"):
        decode_image(png_header_bomb(3000, 3000), ImageLimits(max_pixels=4_000_000))


def test_byte_limit():
    data = encode(solid(), "PNG")
    with pytest.raises(PayloadTooLargeError, match=f"{len(data)} bytes, above the limit of 10 bytes"):
        decode_image(data, ImageLimits(max_bytes=10))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_data_is_a_clear_400(fmt, chelsea):
    data = encode(Image.fromarray(chelsea), fmt)
    with pytest.raises(InvalidInputError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2])


def test_random_and_empty_bytes():
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidInputError, match="not a recognized image format"):
        decode_image(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(InvalidInputError, match="empty"):
        decode_image(b"")


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA"])
def test_formats_we_do_not_read_are_415(fmt):
    with pytest.raises(UnsupportedMediaError, match=f"{fmt} images are not supported"):
        decode_image(encode(solid(size=(16, 16)), fmt))


def test_declared_media_types():
    for ok in (None, "image/png", "image/jpeg; charset=binary", "application/octet-stream", "IMAGE/WEBP"):
        check_media_type(ok)
    with pytest.raises(UnsupportedMediaError, match="image/svg\\+xml"):
        check_media_type("image/svg+xml")


def test_real_photo_round_trip(chelsea):
    decoded = decode_image(encode(Image.fromarray(chelsea), "PNG"))
    assert (decoded.width, decoded.height) == (451, 300)
    assert torch.equal(decoded.pixels, torch.from_numpy(chelsea).permute(2, 0, 1))


def test_preprocess_resizes_the_whole_image_and_normalizes():
    half = np.zeros((50, 100, 3), dtype=np.uint8)
    half[:, :50] = [255, 0, 0]
    half[:, 50:] = [0, 0, 255]
    constant = torch.full((3, 10, 20), 51, dtype=torch.uint8)
    x = preprocess(
        [torch.from_numpy(half).permute(2, 0, 1), constant], (32, 32), mean=(0.5, 0.25, 0.5), std=(0.5, 0.25, 0.5)
    )
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    # no crop: the left half stays red and the right half stays blue
    assert x[0, 0, :, :14].min() > 0.99 and x[0, 2, :, :14].max() < -0.99
    assert x[0, 2, :, 18:].min() > 0.99 and x[0, 0, :, 18:].max() < -0.99
    expected = torch.tensor([(0.2 - 0.5) / 0.5, (0.2 - 0.25) / 0.25, (0.2 - 0.5) / 0.5])
    torch.testing.assert_close(x[1, :, 5, 5], expected)
    assert preprocess([constant], (8, 8), (0, 0, 0), (1, 1, 1), device="cpu").device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_jpeg_decode_matches_cpu(chelsea):
    data = encode(Image.fromarray(chelsea), "JPEG", quality=90)
    cpu = decode_image(data)
    gpu = decode_image(data, device="cuda")
    assert gpu.pixels.device.type == "cuda" and (gpu.width, gpu.height) == (cpu.width, cpu.height)
    difference = (gpu.pixels.cpu().int() - cpu.pixels.int()).abs().float()
    assert difference.mean() < 1.0 and difference.max() <= 16  # IDCT implementations differ slightly


def test_gpu_device_argument_falls_back_for_rotated_jpeg_without_cuda():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(solid(size=(40, 20)), "JPEG", exif=exif.tobytes())
    decoded = decode_image(data, device="cuda")  # rotated: always the CPU path, even on CUDA hosts
    assert decoded.pixels.device.type == "cpu" and (decoded.width, decoded.height) == (20, 40)
