"""Hand-computed maps on a tiny model with fixed weights.

The model is features = ReLU(x) followed by a linear layer on the flattened map, so the gradient of
logit c with respect to the activations is exactly the weight W[c] (reshaped to [K, h, w]).
"""

from __future__ import annotations

import pytest
import torch

from camserve.cam import CamEngine, InvalidTargetError, UnknownMethodError, get_method
from tests.camhelpers import A, G, tiny_model


def explain(method: str, target: int, activations=A, weight=G, **kw) -> torch.Tensor:
    engine = CamEngine(tiny_model(weight))
    result = engine.explain(activations.unsqueeze(0), [[target]], method=method, **kw)
    assert result.layers == ("features",)
    return result.maps[0]


def by_hand_gradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(a.shape[1:])
    for k in range(a.shape[0]):
        w = sum(float(g[k, i, j]) for i in range(a.shape[1]) for j in range(a.shape[2])) / a[k].numel()
        out += w * a[k]
    return out.clamp(min=0)


def by_hand_gradcampp(a: torch.Tensor, g: torch.Tensor, paper: bool = True) -> torch.Tensor:
    """The paper's alpha = g^2 / (2 g^2 + sum(A) g^3); paper=False uses the seeds' sum(A g^3)."""
    out = torch.zeros(a.shape[1:])
    for k in range(a.shape[0]):
        s = float(a[k].sum())
        s_wrong = float((a[k] * g[k] ** 3).sum())
        w = 0.0
        for i in range(a.shape[1]):
            for j in range(a.shape[2]):
                gij = float(g[k, i, j])
                denom = 2 * gij**2 + (s * gij**3 if paper else s_wrong)
                alpha = gij**2 / denom if gij != 0 and denom != 0 else 0.0
                w += alpha * max(gij, 0.0)
        out += w * a[k]
    return out.clamp(min=0)


@pytest.mark.parametrize("target", [0, 1])
def test_gradcam_by_hand(target):
    torch.testing.assert_close(explain("gradcam", target), by_hand_gradcam(A, G[target]))


@pytest.mark.parametrize("target", [0, 1])
def test_gradcampp_by_hand_and_not_the_seed_formula(target):
    ours = explain("gradcampp", target)
    torch.testing.assert_close(ours, by_hand_gradcampp(A, G[target]), rtol=1e-5, atol=1e-6)
    wrong = by_hand_gradcampp(A, G[target], paper=False)
    assert (ours - wrong).abs().max() > 0.05


def test_gradcampp_zero_denominator_gives_zero_alpha():
    """sum(A) * g = -2 makes 2 + sum(A) g vanish: alpha must be 0 there, not inf or NaN."""
    a = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])  # sum 4
    g = torch.tensor([[[[-0.5, 0.25], [0.0, 1.0]]]])  # -0.5 * 4 = -2
    ours = explain("gradcampp", 0, activations=a, weight=g)
    assert torch.isfinite(ours).all()
    # alpha: -0.5 -> 0 (zero denominator), 0.25 -> 1/3, 0 -> 0, 1.0 -> 1/6; w = 0.25/3 + 1/6
    expected_weight = 0.25 / 3 + 1.0 / 6
    torch.testing.assert_close(ours, torch.full((2, 2), expected_weight))
    torch.testing.assert_close(ours, by_hand_gradcampp(a, g[0]))


def test_xgradcam_layercam_hirescam_by_hand():
    g = G[0]
    x_weights = (A * g).sum(dim=(1, 2)) / A.sum(dim=(1, 2))
    torch.testing.assert_close(explain("xgradcam", 0), (x_weights[:, None, None] * A).sum(0).clamp(min=0))
    torch.testing.assert_close(explain("layercam", 0), (g.clamp(min=0) * A).sum(0).clamp(min=0))
    torch.testing.assert_close(explain("hirescam", 0), (g * A).sum(0).clamp(min=0))


def test_counterfactual_uses_negative_gradient():
    torch.testing.assert_close(explain("gradcam", 0, counterfactual=True), by_hand_gradcam(A, -G[0]))
    torch.testing.assert_close(explain("gradcampp", 1, counterfactual=True), by_hand_gradcampp(A, -G[1]))


def test_xgradcam_channel_with_zero_sum_gets_zero_weight():
    a = torch.stack([A[0], torch.zeros(2, 2)])
    ours = explain("xgradcam", 0, activations=a)
    assert torch.isfinite(ours).all()
    x_weight = float((A[0] * G[0, 0]).sum() / A[0].sum())
    torch.testing.assert_close(ours, (x_weight * A[0]).clamp(min=0))


def test_method_names_and_aliases():
    assert get_method("gradcam++").name == "gradcampp"
    assert get_method("GradCAMPP").name == "gradcampp"
    with pytest.raises(UnknownMethodError, match="unknown CAM method 'smoothgradcam'.*gradcampp"):
        get_method("smoothgradcam")


def test_targets_are_validated():
    engine = CamEngine(tiny_model(G))
    x = A.unsqueeze(0).repeat(2, 1, 1, 1)
    with pytest.raises(InvalidTargetError, match="2 classes"):
        engine.explain(x, [[0], [2]])
    with pytest.raises(InvalidTargetError, match="1 target entries for a batch of 2"):
        engine.explain(x, [[0]])
    with pytest.raises(InvalidTargetError, match="not a class index"):
        engine.explain(x, [["cat"], [0]])
    with pytest.raises(InvalidTargetError, match="out of range"):
        engine.explain(x, [[-1], [0]])
