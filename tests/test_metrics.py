"""Explanation metrics on hand-computable cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from camserve.cam import metrics


def test_box_to_mask_clips_to_the_image():
    mask = metrics.box_to_mask((-5, 2, 3, 100), height=6, width=8)
    assert mask.sum() == 3 * 4 and mask[2:, :3].all() and not mask[:2].any() and not mask[:, 3:].any()


def test_pointing_game_tolerance_is_euclidean_15_px():
    saliency = torch.zeros(60, 60)
    saliency[10, 10] = 1.0
    near = torch.zeros(60, 60, dtype=torch.bool)
    near[10, 25] = True  # exactly 15 px away
    far = torch.zeros(60, 60, dtype=torch.bool)
    far[10, 26] = True  # 16 px away
    diagonal = torch.zeros(60, 60, dtype=torch.bool)
    diagonal[21, 21] = True  # sqrt(242) = 15.56 px
    assert metrics.pointing_game_hit(saliency, near)
    assert not metrics.pointing_game_hit(saliency, far)
    assert not metrics.pointing_game_hit(saliency, diagonal)
    assert metrics.pointing_game_hit(saliency, diagonal, tolerance=16)


def test_pointing_game_ties_take_the_first_maximum_in_row_major_order():
    saliency = torch.zeros(40, 40)
    saliency[0, 0] = saliency[39, 39] = 1.0
    mask = torch.zeros(40, 40, dtype=torch.bool)
    mask[39, 39] = True
    assert not metrics.pointing_game_hit(saliency, mask, tolerance=5)
    assert metrics.pointing_game_accuracy({"cat": [True, False], "dog": [True, True, True, True]}) == 0.75


def test_energy_pointing_game_and_zero_map():
    saliency = torch.tensor([[1.0, 3.0], [0.0, 4.0]])
    mask = torch.tensor([[False, True], [False, True]])
    assert metrics.energy_pointing_game(saliency, mask) == pytest.approx(7 / 8)
    assert metrics.energy_pointing_game(torch.zeros(2, 2), mask) == 0.0
    with pytest.raises(ValueError, match=r"must both be \[H, W\]"):
        metrics.energy_pointing_game(saliency, mask[:1])


def test_instance_coverage():
    saliency = torch.zeros(10, 20)
    saliency[:, :10] = 1.0  # covers the left instance fully
    saliency[:, 10:15] = 0.6  # and half of the right one
    left = metrics.box_to_mask((0, 0, 10, 10), 10, 20)
    right = metrics.box_to_mask((10, 0, 20, 10), 10, 20)
    assert metrics.instance_coverage(saliency, [left, right]) == [1.0, 0.5]


class LinearScore:
    """Probability of class c = softmax(W @ mean-per-channel(x))."""

    def __init__(self) -> None:
        self.weight = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x.mean(dim=(2, 3)) @ self.weight.T, dim=1)


def test_average_drop_and_increase_by_hand():
    score = LinearScore()
    inputs = torch.ones(2, 3, 4, 4)
    inputs[1, 0] = -1.0
    saliency = torch.stack([torch.full((4, 4), 0.5), torch.full((4, 4), 0.5)])
    classes = torch.tensor([0, 0])
    y = score(inputs)[:, 0]
    o = score(inputs * 0.5)[:, 0]
    expected_drop = (torch.clamp(y - o, min=0) / y).mean() * 100
    expected_increase = (y < o).float().mean() * 100
    drop, increase = metrics.average_drop_increase(score, inputs, saliency, classes)
    assert drop == pytest.approx(float(expected_drop), rel=1e-5)
    assert increase == pytest.approx(float(expected_increase)) == 50.0  # image 1 gains when halved


class CountScore:
    """Class-0 probability = fraction of pixels whose channel 0 equals 1 (class 1 the rest)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = (x[:, 0] == 1).float().mean(dim=(1, 2))
        return torch.stack([p, 1 - p], dim=1)


def test_deletion_curve_counts_pixels_and_auc_is_the_trapezoid():
    inputs = torch.ones(1, 3, 4, 5)  # 20 pixels
    saliency = torch.arange(20.0).view(1, 4, 5)
    curve = metrics.deletion_curve(CountScore(), inputs, saliency, torch.tensor([0]), pixels_per_step=3, batch_size=2)
    steps = math.ceil(20 / 3)
    expected = torch.tensor([max(0.0, 1 - 3 * k / 20) for k in range(steps + 1)])
    torch.testing.assert_close(curve[0], expected)
    trapezoid = float(np.trapezoid(expected.numpy(), dx=1 / steps))
    assert float(metrics.auc(curve)[0]) == pytest.approx(trapezoid)


def test_deletion_removes_the_most_salient_pixels_first():
    inputs = torch.ones(1, 3, 2, 2)
    inputs[0, 0, 0, 0] = 0.0  # this pixel does not count for class 0
    best = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])  # the zero pixel ranked last
    worst = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # the zero pixel ranked first
    good = metrics.deletion_curve(CountScore(), inputs, best, torch.tensor([0]), pixels_per_step=1)
    bad = metrics.deletion_curve(CountScore(), inputs, worst, torch.tensor([0]), pixels_per_step=1)
    assert metrics.auc(good) < metrics.auc(bad)


def test_insertion_starts_from_the_blurred_image_and_ends_at_the_input():
    torch.manual_seed(0)
    inputs = torch.randn(2, 3, 16, 16)
    saliency = torch.rand(2, 16, 16)
    score = LinearScore()
    classes = torch.tensor([0, 1])
    curve = metrics.insertion_curve(score, inputs, saliency, classes, pixels_per_step=32)
    from torchvision.transforms.functional import gaussian_blur

    blurred = gaussian_blur(inputs, [11, 11], [5.0, 5.0])
    torch.testing.assert_close(curve[:, 0], score(blurred).gather(1, classes[:, None])[:, 0])
    torch.testing.assert_close(curve[:, -1], score(inputs).gather(1, classes[:, None])[:, 0])
    deletion, insertion = metrics.deletion_insertion_auc(score, inputs, saliency, classes, pixels_per_step=32)
    assert deletion.shape == insertion.shape == (2,)


def test_spearman_matches_scipy_with_ties():
    torch.manual_seed(0)
    a = torch.randint(0, 5, (7, 7)).float()
    b = a + torch.randn(7, 7)
    assert metrics.spearman_rank_correlation(a, b) == pytest.approx(spearmanr(a.flatten(), b.flatten()).statistic)
    assert metrics.spearman_rank_correlation(a, a) == pytest.approx(1.0)
    assert metrics.spearman_rank_correlation(a, -a) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="49 and 4"):
        metrics.spearman_rank_correlation(a, torch.zeros(2, 2))
