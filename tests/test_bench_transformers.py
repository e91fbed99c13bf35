"""The transformer benchmark's pure helpers: token reshape, map comparison, Grad-CAM++ eq. 19, ratios."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.bench_engine import photo_batch, summarize
from bench.bench_transformers import (
    add_speedups,
    gradcampp_eq19,
    max_abs_diff,
    minmax,
    p90_disturbed,
    targets_met,
    tokens_to_nchw,
)
from camserve.cam import get_method


def test_tokens_to_nchw_drops_the_prefix_and_moves_channels_first():
    grid = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 2, 3, 3)  # [B, h, w, C]
    tokens = torch.cat([torch.full((2, 1, 3), -1.0), grid.reshape(2, 6, 3)], dim=1)  # class token first
    out = tokens_to_nchw(tokens, grid=(2, 3), prefix=1)
    assert out.shape == (2, 3, 2, 3)
    assert torch.equal(out, grid.permute(0, 3, 1, 2))


def test_minmax_and_max_abs_diff_ignore_scale_and_offset():
    maps = np.random.default_rng(0).random((3, 4, 4)).astype(np.float32)
    scaled = minmax(maps)
    assert scaled.min(axis=(1, 2)) == pytest.approx([0, 0, 0]) and scaled.max(axis=(1, 2)) == pytest.approx([1, 1, 1])
    assert max_abs_diff(maps, 5 * maps + 2) < 1e-6
    assert minmax(np.ones((1, 2, 2))).max() == 0  # flat map: no division by zero
    with pytest.raises(ValueError):
        max_abs_diff(maps, maps[:, :2])


def test_gradcampp_eq19_matches_the_engines_method():
    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(2, 5, 3, 3, generator=generator)
    grads = torch.randn(2, 5, 3, 3, generator=generator) * 1e-4
    grads[0, 0, 0, 0] = 0
    ours = get_method("gradcampp")(activations, grads).numpy()
    assert np.abs(gradcampp_eq19(activations.numpy(), grads.numpy()) - ours).max() < 1e-5 * np.abs(ours).max()


def test_photo_batch_default_normalisation_unchanged_and_imagenet_mean_std():
    default = photo_batch(2, 32, torch.device("cpu"))
    explicit = photo_batch(2, 32, torch.device("cpu"), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert torch.equal(default, explicit)
    imagenet = photo_batch(2, 32, torch.device("cpu"), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pixels = default * 0.5 + 0.5
    assert torch.allclose(imagenet[:, 1], (pixels[:, 1] - 0.456) / 0.224, atol=1e-5)


def rows_for(model: str, batch: int, times: dict[str, list[float]]) -> list[dict[str, object]]:
    return [{"model": model, "batch": batch, **row} for row in summarize(times)]


def test_ratios_speedups_targets_and_disturbance():
    rows = rows_for(
        "m",
        1,
        {
            "predict": [10.0, 10.0, 11.0],
            "ours gradcam": [11.0, 11.0, 12.0],
            "pgc gradcam": [44.0, 44.0, 45.0],
        },
    ) + rows_for("m", 8, {"predict": [100.0, 100.0, 500.0], "ours gradcam": [130.0] * 3, "pgc gradcam": [300.0] * 3})
    add_speedups(rows)
    by = {(r["batch"], r["contender"]): r for r in rows}
    assert by[(1, "ours gradcam")]["x_predict"] == pytest.approx(1.1)
    assert by[(1, "ours gradcam")]["speedup_vs_pgc"] == pytest.approx(4.0)
    assert by[(8, "ours gradcam")]["speedup_vs_pgc"] == pytest.approx(300 / 130)
    assert "speedup_vs_pgc" not in by[(1, "pgc gradcam")]
    summary = targets_met(rows)
    assert summary["explain_x_predict_range"] == pytest.approx([1.1, 1.3])
    assert summary["explain_le_1.2x_predict"] is False and summary["ge_3x_faster_than_pgc"] is False
    assert p90_disturbed(rows) == ["m b8 predict"]
