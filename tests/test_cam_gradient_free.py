"""Score-CAM, Ablation-CAM and Eigen-CAM: hand-computed cases on a tiny fixed-weight model, token layers,
fusion, the split/hook equivalence and option checks.

The tiny model (tests/camhelpers.py) is features = ReLU(x) followed by a bias-free linear layer on the
flattened map, so the input *is* the activation (all positive here) and logit c = sum(W[c] * A).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from camserve.cam import CamEngine, CamError, get_method
from camserve.cam import reruns as reruns_module
from camserve.cam.split import SplitError
from tests.camhelpers import A, G, tiny_model


def explain(method: str, targets=(0, 1), activations=A, weight=G, **kw):
    engine = CamEngine(tiny_model(weight))
    return engine.explain(activations.unsqueeze(0), [list(targets)], method=method, **kw)


# -- Ablation-CAM --------------------------------------------------------------------------------
def test_ablationcam_by_hand():
    # Class 0: channel 0 contributes 1*0.1 + 2*(-0.2) + 3*0.3 + 4*0 = 0.6, channel 1
    # 0.5*(-0.25) + 0*0.5 + 2*0.05 + 1.5*0.2 = 0.275; y = 0.875. Zeroing channel k removes its contribution,
    # so w_k = (y - y^k) / y = contribution_k / y.
    maps = explain("ablationcam").maps
    w0, w1 = 0.6 / 0.875, 0.275 / 0.875
    torch.testing.assert_close(maps[0], (w0 * A[0] + w1 * A[1]).clamp(min=0))
    # Class 1: contributions 0.02 + 0.08 - 0.3 + 1.2 = 1.0 and 0.3 + 0 + 0 + 0.6 = 0.9; y = 1.9.
    torch.testing.assert_close(maps[1], ((1.0 * A[0] + 0.9 * A[1]) / 1.9).clamp(min=0))


def test_ablationcam_negative_score_divides_by_it_as_the_paper_does():
    """y_c < 0 flips every weight's sign: w_k = (y - y^k) / y."""
    weight = -G
    maps = explain("ablationcam", targets=(0,), weight=weight).maps
    # contributions -0.6 and -0.275, y = -0.875: the weights are the same positive ratios
    torch.testing.assert_close(maps[0], ((0.6 * A[0] + 0.275 * A[1]) / 0.875).clamp(min=0))


def test_ablationcam_hook_fallback_equals_the_split(monkeypatch, caplog):
    by_split = explain("ablationcam").maps

    def no_export(*args, **kwargs):
        raise SplitError("the model does not export (test)")

    monkeypatch.setattr(reruns_module, "export_model", no_export)
    engine = CamEngine(tiny_model(G))
    x = A.unsqueeze(0)
    with caplog.at_level("WARNING"):
        first = engine.explain(x, [[0, 1]], method="ablationcam").maps
        again = engine.explain(x, [[0, 1]], method="ablationcam").maps
    torch.testing.assert_close(first, by_split)
    torch.testing.assert_close(again, by_split)
    assert sum("does not export" in r.message for r in caplog.records) == 1  # logged once per engine


# -- Score-CAM -----------------------------------------------------------------------------------
def by_hand_scorecam(a: torch.Tensor, weight: torch.Tensor, target: int) -> torch.Tensor:
    """The paper, written out: mask = min-max normalized channel (2x2 grid = input size, so no resize),
    f = softmax probability of the class on the masked input, weights = softmax over channels of f."""
    x = a  # the input is the activation
    probabilities = []
    for k in range(a.shape[0]):
        low, high = float(a[k].min()), float(a[k].max())
        mask = [[(float(a[k, i, j]) - low) / (high - low) for j in range(2)] for i in range(2)]
        logits = []
        for c in range(weight.shape[0]):
            total = 0.0
            for ch in range(a.shape[0]):
                for i in range(2):
                    for j in range(2):
                        total += max(float(x[ch, i, j]) * mask[i][j], 0.0) * float(weight[c, ch, i, j])
            logits.append(total)
        exps = [math.exp(v) for v in logits]
        probabilities.append(exps[target] / sum(exps))
    alphas = [math.exp(p) / sum(math.exp(q) for q in probabilities) for p in probabilities]
    return sum(alpha * a[k] for k, alpha in enumerate(alphas)).clamp(min=0)


def test_scorecam_by_hand():
    maps = explain("scorecam").maps
    torch.testing.assert_close(maps[0], by_hand_scorecam(A, G, 0))
    torch.testing.assert_close(maps[1], by_hand_scorecam(A, G, 1))
    assert not torch.allclose(maps[0], maps[1])


def test_scorecam_constant_channel_masks_everything_out():
    """A constant channel has no min-max normalization: its mask is 0, the masked input all zeros."""
    a = torch.stack([A[0], torch.full((2, 2), 0.7)])
    maps = explain("scorecam", targets=(0,), activations=a).maps
    # channel 0's masked input -> logits as computed by hand; channel 1's -> zero input -> logits 0 -> p = 1/2
    mask = (A[0] - 1.0) / 3.0
    masked = a * mask
    logits = (G * masked.clamp(min=0)).sum(dim=(1, 2, 3))
    p0 = torch.softmax(logits, dim=0)[0]
    alpha = torch.softmax(torch.stack([p0, torch.tensor(0.5)]), dim=0)
    torch.testing.assert_close(maps[0], (alpha[0] * a[0] + alpha[1] * a[1]).clamp(min=0))


def test_scorecam_runs_in_chunks_of_the_configured_size():
    engine = CamEngine(tiny_model(G), rerun_batch_size=1)
    seen: list[int] = []
    original = engine._reruns.logits

    def counting(inputs):
        seen.append(inputs.shape[0])
        return original(inputs)

    engine._reruns.logits = counting
    maps = engine.explain(A.unsqueeze(0), [[0]], method="scorecam").maps
    assert seen == [1, 1]
    torch.testing.assert_close(maps[0], by_hand_scorecam(A, G, 0))


# -- Eigen-CAM -----------------------------------------------------------------------------------
def test_eigencam_by_hand_and_the_same_for_every_target():
    # positions x channels: (1, .5), (2, 0), (3, 2), (4, 1.5); centered: (-1.5, -.5), (-.5, -1), (.5, 1),
    # (1.5, .5). X^T X = [[5, 2.5], [2.5, 2.5]]: eigenvalue (7.5 + sqrt(31.25)) / 2, eigenvector
    # (1, (lambda - 5) / 2.5) = (1, 0.618...) (loadings sum positive: the sign kept).
    maps = explain("eigencam").maps
    lam = (7.5 + math.sqrt(31.25)) / 2
    v = torch.tensor([1.0, (lam - 5) / 2.5])
    v = v / v.norm()
    centered = torch.tensor([[-1.5, -0.5], [-0.5, -1.0], [0.5, 1.0], [1.5, 0.5]])
    expected = (centered @ v).reshape(2, 2).clamp(min=0)
    torch.testing.assert_close(maps[0], expected)
    torch.testing.assert_close(maps[1], expected)  # no class dependence
    assert expected[1, 1] > expected[1, 0] > 0 and expected[0, 0] == 0


@pytest.mark.parametrize(("method", "records"), [("eigencam", False), ("ablationcam", False), ("gradcam", True)])
def test_only_gradient_methods_record_autograd(method, records):
    """The explanation's own forward records autograd after the layer only for methods that take a gradient."""
    engine = CamEngine(tiny_model(G))
    engine.trace(A.unsqueeze(0))  # its probes first
    recorded: list[bool] = []
    engine.model.fc.register_forward_hook(lambda _m, _i, out: recorded.append(out.requires_grad))
    engine.explain(A.unsqueeze(0), [[0]], method=method)
    assert recorded[0] is records  # the first forward is the explanation's (ablations follow on a split)


def test_eigencam_sign_follows_the_loadings_not_the_svd():
    """Negating every activation negates the SVD's vectors too; the convention flips the projection back
    only if the loadings' sum says so: here the channels load with opposite signs."""
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[4.0, 3.0], [2.0, 0.0]]])
    maps = explain("eigencam", targets=(0,), activations=a).maps[0]
    centered = a.flatten(1).T - a.flatten(1).T.mean(dim=0)
    _, _, vh = torch.linalg.svd(centered.double(), full_matrices=False)
    v = vh[0] * torch.sign(vh[0].sum())
    torch.testing.assert_close(maps, (centered.double() @ v).reshape(2, 2).clamp(min=0).float())


# -- options and cost -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "eigencam"])
def test_counterfactual_is_refused_for_gradient_free_methods(method):
    with pytest.raises(CamError, match=f"{method} uses none.*without counterfactual"):
        explain(method, counterfactual=True)


def test_cost_is_images_times_channels_for_perturbation_methods_only():
    assert get_method("scorecam").extra_forwards(3, [320, 1280]) == 3 * 1600
    assert get_method("ablationcam").extra_forwards(2, [1280]) == 2560
    assert get_method("eigencam").extra_forwards(3, [1280]) == 0
    assert get_method("gradcam").extra_forwards(3, [1280]) == 0
    assert get_method("Score-CAM").name == "scorecam" and get_method("eigen-cam").name == "eigencam"


# -- token layers, fusion -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, embed_dim=48, num_heads=2)
    return model.eval()


def by_hand_token_ablation(model: nn.Module, layer: str, x: torch.Tensor, target: int) -> torch.Tensor:
    """Zero channel k of the layer's output in every token (one full forward each) and apply the formula."""
    module = dict(model.named_modules())[layer]
    saved = {}
    handle = module.register_forward_hook(lambda m, i, o: saved.setdefault("a", o.clone()))
    with torch.no_grad():
        y = float(model(x)[0, target])
    handle.remove()
    tokens = saved["a"][0]  # [N, C]
    weights = []
    for k in range(tokens.shape[1]):
        ablated = tokens.clone()
        ablated[:, k] = 0
        handle = module.register_forward_hook(lambda m, i, o, a=ablated: a[None])
        with torch.no_grad():
            weights.append((y - float(model(x)[0, target])) / y)
        handle.remove()
    grid = tokens[1:].T.reshape(-1, 4, 4)  # class token dropped, 4x4 patch grid
    return (torch.tensor(weights)[:, None, None] * grid).sum(0).clamp(min=0)


def test_token_layer_ablationcam_equals_the_definition(tiny_vit):
    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 64)
    engine = CamEngine(tiny_vit)
    ours = engine.explain(x, [[3]], method="ablationcam", layers="blocks.1.norm1").maps[0]
    assert ours.shape == (4, 4)
    split = engine._reruns._splits["blocks.1.norm1"]  # the residual stream is carried past the layer, per row
    assert split is not None and split.kinds == ("batch", "rows")
    torch.testing.assert_close(ours, by_hand_token_ablation(tiny_vit, "blocks.1.norm1", x, 3), atol=1e-4, rtol=1e-4)


def test_token_layer_scorecam_and_eigencam(tiny_vit):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 64, 64)
    engine = CamEngine(tiny_vit)
    layer = "blocks.0"
    saved = {}
    handle = dict(tiny_vit.named_modules())[layer].register_forward_hook(lambda m, i, o: saved.setdefault("a", o))
    with torch.no_grad():
        tiny_vit(x)
    handle.remove()
    grid = saved["a"][:, 1:].transpose(1, 2).reshape(2, 48, 4, 4)
    score = engine.explain(x, [[5], [7]], method="scorecam", layers=layer).maps
    eigen = engine.explain(x, [[5], [7]], method="eigencam", layers=layer).maps
    for i, target in enumerate([5, 7]):
        probabilities = []
        for k in range(48):
            up = nn.functional.interpolate(grid[i, k][None, None], size=(64, 64), mode="bilinear")
            mask = (up - up.min()) / (up.max() - up.min())
            with torch.no_grad():
                probabilities.append(torch.softmax(tiny_vit(x[i : i + 1] * mask), dim=1)[0, target])
        alpha = torch.softmax(torch.stack(probabilities), dim=0)
        expected = (alpha[:, None, None] * grid[i]).sum(0).clamp(min=0)
        torch.testing.assert_close(score[i], expected, atol=1e-5, rtol=1e-4)
        matrix = grid[i].flatten(1).T.double()
        centered = matrix - matrix.mean(dim=0)
        _, _, vh = torch.linalg.svd(centered, full_matrices=False)
        projection = centered @ (vh[0] * torch.sign(vh[0].sum()))
        torch.testing.assert_close(eigen[i], projection.reshape(4, 4).clamp(min=0).float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["ablationcam", "eigencam", "scorecam"])
def test_fusion_averages_the_normalized_layer_maps(tiny_vit, method):
    torch.manual_seed(3)
    x = torch.randn(1, 3, 64, 64)
    engine = CamEngine(tiny_vit)
    layers = ["blocks.0.norm1", "blocks.1.norm1"]
    fused = engine.explain(x, [[1]], method=method, layers=layers)
    singles = [engine.explain(x, [[1]], method=method, layers=name).maps for name in layers]
    assert fused.layers == tuple(layers)
    for name, single in zip(layers, singles, strict=True):
        torch.testing.assert_close(fused.layer_maps[name], single)
    normalized = [(m - m.amin()) / (m.amax() - m.amin()) for m in singles]
    torch.testing.assert_close(fused.maps, (normalized[0] + normalized[1]) / 2)
