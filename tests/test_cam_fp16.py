"""float16 gradient scaling (camserve/cam/scaling.py) and host-built pair plans (camserve/cam/pairs.py), on CPU.

torch's CPU autocast runs convolutions and linear layers in float16, so the underflow the scaling fixes
shows here as it would on a GPU: a head scaled down makes every gradient smaller than float16 can hold.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from camserve.cam import CamEngine, InvalidTargetError, metrics, scaling
from camserve.cam.pairs import plan_pairs

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
TARGETS = [[3, 7], [4]]


def tiny(head_gain: float = 1.0) -> nn.Module:
    """conv-relu-conv-relu-pool-linear; layer "2" is the last conv. The head is multiplied by `head_gain`."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    with torch.no_grad():
        model[6].weight.mul_(head_gain)
    return model.eval()


def explain(model: nn.Module, method: str = "gradcampp", **engine: object):
    return CamEngine(model, **engine).explain(X, TARGETS, method=method, layers="2")


def count_backwards(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the gradient-output fill of every backward pass (all target rounds) the engine runs."""
    fills: list[float] = []
    original = CamEngine._backward

    def spy(logits, inputs, plan, fill, *, retain):
        fills.append(fill)
        return original(logits, inputs, plan, fill, retain=retain)

    monkeypatch.setattr(CamEngine, "_backward", staticmethod(spy))
    return fills


def test_scale_schedule_and_validation():
    assert scaling.scales(2.0**12) == [4096.0, 256.0, 16.0, 1.0]
    assert scaling.scales(2.0**5) == [32.0, 2.0, 1.0]
    assert scaling.scales(1) == [1.0]
    assert scaling.default_scale(torch.float16) == 2.0**12
    assert scaling.default_scale(torch.bfloat16) == scaling.default_scale(None) == 1.0
    for bad in (3.0, 0.5, 0.0, float("inf"), float("nan"), -4.0):
        with pytest.raises(ValueError):
            scaling.check_scale(bad)
    with pytest.raises(ValueError):
        CamEngine(tiny(), gradient_scale=1000)


def test_all_finite():
    assert scaling.all_finite([torch.ones(3), torch.zeros(2, 2)])
    assert not scaling.all_finite([torch.ones(3), torch.tensor([1.0, float("inf")])])
    assert not scaling.all_finite([torch.tensor([float("nan")])])
    assert scaling.all_finite([])


@pytest.mark.parametrize("method", ["gradcampp", "gradcam", "guided-gradcam"])
def test_scaled_and_unscaled_float32_gradients_are_identical(method):
    """Powers of two scale every float32 product and sum exactly, so unscaling restores the bits."""
    plain = explain(tiny(), method)
    scaled = explain(tiny(), method, gradient_scale=2.0**12)
    assert torch.equal(plain.maps, scaled.maps)
    assert float(plain.maps.abs().max()) > 0
    if method == "guided-gradcam":
        assert torch.equal(plain.guided, scaled.guided)


def test_float32_and_bfloat16_run_one_unscaled_backward_per_round(monkeypatch):
    fills = count_backwards(monkeypatch)
    explain(tiny())
    explain(tiny(), autocast_dtype=torch.bfloat16)
    assert fills == [1.0, 1.0]  # one pass each, fill 1, no finiteness check


def test_float16_gradients_underflow_without_scaling_and_survive_with_it(monkeypatch):
    """Gradients near 1e-8 flush to zero in float16; scaled by 2**12 they match float32."""
    reference = explain(tiny(1e-5))
    assert float(reference.maps.amax()) > 0
    unscaled = explain(tiny(1e-5), autocast_dtype=torch.float16, gradient_scale=1)
    assert float(unscaled.maps.abs().max()) == 0.0  # the failure the scaling prevents
    fills = count_backwards(monkeypatch)
    scaled = explain(tiny(1e-5), autocast_dtype=torch.float16)
    assert fills == [2.0**12]  # default scale, no retry
    assert torch.isfinite(scaled.maps).all()
    relative = (scaled.maps - reference.maps).abs().max() / reference.maps.abs().max()
    assert relative < 0.02, float(relative)
    for i in range(len(TARGETS)):
        assert metrics.spearman_rank_correlation(scaled.maps[i], reference.maps[i]) >= 0.99


def test_guided_input_gradient_survives_float16():
    reference = explain(tiny(1e-5), "guided-gradcam")
    unscaled = explain(tiny(1e-5), "guided-gradcam", autocast_dtype=torch.float16, gradient_scale=1)
    scaled = explain(tiny(1e-5), "guided-gradcam", autocast_dtype=torch.float16)
    assert float(unscaled.guided.abs().max()) == 0.0
    assert float(scaled.guided.abs().max()) > 0
    tolerance = 0.02 * float(reference.guided.abs().max())
    torch.testing.assert_close(scaled.guided, reference.guided, rtol=0.05, atol=tolerance)


def test_overflow_retries_at_a_lower_scale(monkeypatch):
    """A head of ~1e3 makes 2**12-scaled gradients overflow float16: the pass is redone at 2**8, 2**4 or 1."""
    reference = explain(tiny(1e4))
    fills = count_backwards(monkeypatch)
    result = explain(tiny(1e4), autocast_dtype=torch.float16)
    assert fills[0] == 2.0**12 and len(fills) > 1  # the first try overflowed
    assert fills[1:] == [2.0**8, 2.0**4, 1.0][: len(fills) - 1]
    assert torch.isfinite(result.maps).all()
    relative = (result.maps - reference.maps).abs().max() / reference.maps.abs().max()
    assert relative < 0.02, float(relative)


def test_counterfactual_keeps_its_sign_under_scaling():
    reference = CamEngine(tiny(1e-5)).explain(X, TARGETS, method="gradcam", layers="2", counterfactual=True)
    scaled = CamEngine(tiny(1e-5), autocast_dtype=torch.float16).explain(
        X, TARGETS, method="gradcam", layers="2", counterfactual=True
    )
    assert float(reference.maps.amax()) > 0
    relative = (scaled.maps - reference.maps).abs().max() / reference.maps.abs().max()
    assert relative < 0.02, float(relative)


def test_pair_plan_groups_rows_by_round_on_host_and_device():
    logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 9.0], [1.0, 0.0, 0.0]])
    plan = plan_pairs([[2, 0], None, [], 1], logits)
    assert plan.images == [0, 0, 1, 3] and plan.classes == [2, 0, 0, 1]
    assert plan.image_index.tolist() == plan.images and plan.class_index.tolist() == plan.classes
    rounds = [(r.rows.tolist(), r.images.tolist(), r.classes.tolist()) for r in plan.rounds]
    assert rounds == [([0, 2, 3], [0, 1, 3], [2, 0, 1]), ([1], [0], [0])]
    top1 = plan_pairs(None, logits)
    assert top1.classes == [1, 0, 2, 0] and len(top1.rounds) == 1
    empty = plan_pairs([[], []], logits[:2])
    assert len(empty) == 0 and empty.rounds == [] and empty.image_index.numel() == 0
    with pytest.raises(InvalidTargetError, match="out of range"):
        plan_pairs([[3], None, None, None], logits)


def test_explanation_carries_host_pairs():
    result = explain(tiny())
    assert result.pairs == [(0, 3), (0, 7), (1, 4)]
    assert result.pairs == list(zip(result.image_index.tolist(), result.class_index.tolist(), strict=True))
