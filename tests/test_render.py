"""Rendering: normalization, resizing, colormaps from matplotlib, blending, PNG encoding."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from camserve.cam import render
from camserve.errors import InvalidParameterError


def test_minmax_normalize_per_map_and_zero_map_stays_zero():
    maps = torch.stack([torch.tensor([[1.0, 3.0], [5.0, 2.0]]), torch.zeros(2, 2), torch.full((2, 2), 7.0)])
    out = render.minmax_normalize(maps)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.5], [1.0, 0.25]]))
    assert torch.equal(out[1], torch.zeros(2, 2)) and torch.equal(out[2], torch.zeros(2, 2))
    assert not torch.isnan(out).any()


def test_heatmaps_resize_to_any_size_and_span_zero_to_one():
    maps = torch.arange(12.0).reshape(1, 3, 4)
    heat = render.heatmaps(maps, (300, 451))
    assert heat.shape == (1, 300, 451)
    assert heat.min() == 0 and heat.max() == 1
    # bilinear with half-pixel centres: the top-left output pixel keeps the top-left input value
    assert heat[0, 0, 0] == 0 and heat[0, -1, -1] == 1
    small = render.heatmaps(torch.rand(2, 64, 64), (5, 7))
    assert small.shape == (2, 5, 7)


@pytest.mark.parametrize("name", render.COLORMAPS)
def test_colorize_uses_matplotlib_tables(name):
    heat = torch.tensor([[[0.0, 0.5, 1.0]]])
    colors = render.colorize(heat, name)
    assert colors.shape == (1, 3, 1, 3)
    expected = matplotlib.colormaps[name](np.array([0, 128, 255]) / 255.0)[:, :3]
    np.testing.assert_allclose(colors[0, :, 0].T.numpy(), expected, atol=1e-6)


def test_unknown_colormap_and_bad_alpha_are_refused():
    with pytest.raises(InvalidParameterError, match="unknown colormap 'rainbow'.*jet"):
        render.colorize(torch.zeros(1, 2, 2), "rainbow")
    with pytest.raises(InvalidParameterError, match="alpha"):
        render.blend(torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2), alpha=1.5)


def test_blend_and_png_round_trip():
    image = torch.zeros(1, 3, 4, 5)
    colors = torch.ones(1, 3, 4, 5)
    blended = render.blend(image, colors, alpha=0.25)
    torch.testing.assert_close(blended, torch.full((1, 3, 4, 5), 0.25))
    rgb = render.to_uint8(blended[0])
    decoded = Image.open(io.BytesIO(render.encode_png(rgb)))
    assert decoded.mode == "RGB" and decoded.size == (5, 4)
    assert np.asarray(decoded)[0, 0].tolist() == [64, 64, 64]
    gray = render.to_uint8(torch.linspace(0, 1, 20).reshape(4, 5))
    decoded_gray = Image.open(io.BytesIO(render.encode_png(gray)))
    assert decoded_gray.mode == "L"
    assert np.array_equal(np.asarray(decoded_gray), gray.numpy())


# -- the numpy/PIL twins the service renders with, off the torch thread ---------------------------------


@pytest.mark.parametrize(
    ("shape", "size"),
    [((7, 7), (300, 451)), ((14, 14), (512, 512)), ((224, 224), (100, 90)), ((7, 7), (7, 7)), ((20, 5), (10, 40))],
)
def test_heatmap_image_matches_the_torch_renderer(shape, size):
    maps = torch.randn(1, *shape, generator=torch.Generator().manual_seed(sum(shape)))
    expected = render.to_uint8(render.heatmaps(maps, size))[0].numpy()
    got = render.heatmap_image(maps[0].numpy(), size)
    assert got.dtype == np.uint8 and got.shape == size
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert got.min() == 0 and got.max() == 255


def test_heatmap_image_of_a_constant_map_is_black():
    assert not render.heatmap_image(np.full((7, 7), 3.0, dtype=np.float32), (30, 40)).any()
    assert render.heatmap_image(np.zeros((2, 2)), (3, 3)).shape == (3, 3)


@pytest.mark.parametrize("name", ["jet", "viridis"])
def test_overlay_image_matches_the_torch_renderer(chelsea, name):
    maps = torch.randn(1, 7, 7, generator=torch.Generator().manual_seed(3))
    size = chelsea.shape[:2]
    heat = render.heatmaps(maps, size)
    picture = torch.from_numpy(chelsea).permute(2, 0, 1)[None].float() / 255
    expected = render.to_uint8(render.blend(picture, render.colorize(heat, name), 0.3))[0].permute(1, 2, 0).numpy()
    got = render.overlay_image(chelsea, render.heatmap_image(maps[0].numpy(), size), name, 0.3)
    assert got.dtype == np.uint8 and got.shape == chelsea.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    with pytest.raises(InvalidParameterError, match="unknown colormap"):
        render.overlay_image(chelsea, got[..., 0], "rainbow")
    with pytest.raises(InvalidParameterError, match="alpha"):
        render.overlay_image(chelsea, got[..., 0], "jet", -0.1)


def test_png_of_numpy_arrays_round_trips():
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    gray = rgb[..., 0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(render.encode_png(rgb)))), rgb)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(render.encode_png(gray)))), gray)
