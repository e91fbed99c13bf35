"""Agreement with pytorch-grad-cam 1.5.7 (test-only reference) at feature resolution."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUModel
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from camserve.cam import CamEngine
from camserve.cam.render import minmax_normalize
from tests.camhelpers import TARGETS, EpsGradCAMPlusPlus, reference_maps
from tests.conftest import to_lite_input


@pytest.fixture(scope="module")
def photos(chelsea: np.ndarray, coffee: np.ndarray) -> torch.Tensor:
    return torch.cat([to_lite_input(chelsea), to_lite_input(coffee)])


def _models(lite0: torch.nn.Module, resnet18: torch.nn.Module, which: str):
    if which == "lite0":
        return lite0, "_blocks.15", lambda m: m._blocks[15]
    return resnet18, "layer4", lambda m: m.layer4


@pytest.mark.parametrize("which", ["lite0", "resnet18"])
@pytest.mark.parametrize("method", ["gradcam", "xgradcam", "layercam", "hirescam"])
def test_matches_pytorch_grad_cam(method, which, lite0, resnet18, photos):
    base, name, get_layer = _models(lite0, resnet18, which)
    reference_model = copy.deepcopy(base)
    theirs = reference_maps(method, reference_model, get_layer(reference_model), photos)
    ours = CamEngine(copy.deepcopy(base)).explain(photos, [[t] for t in TARGETS], method=method, layers=name)
    mine = minmax_normalize(ours.maps).numpy()
    assert mine.shape == theirs.shape == (2, 7, 7)
    np.testing.assert_allclose(mine, theirs, atol=5e-5)
    assert not np.allclose(mine[0], mine[1], atol=1e-2)  # two different photos and classes


@pytest.mark.parametrize("which", ["lite0", "resnet18"])
def test_gradcampp_matches_with_the_same_eps(which, lite0, resnet18, photos):
    base, name, get_layer = _models(lite0, resnet18, which)
    reference_model = copy.deepcopy(base)
    theirs = reference_maps("gradcampp", reference_model, get_layer(reference_model), photos)
    engine = CamEngine(copy.deepcopy(base))
    with_eps = engine.explain(photos, [[t] for t in TARGETS], method=EpsGradCAMPlusPlus(), layers=name)
    np.testing.assert_allclose(minmax_normalize(with_eps.maps).numpy(), theirs, atol=5e-5)
    # Our eps-free formula differs from theirs on these small gradients: the eps is not negligible.
    exact = engine.explain(photos, [[t] for t in TARGETS], method="gradcampp", layers=name)
    assert np.abs(minmax_normalize(exact.maps).numpy() - theirs).max() > 1e-2


@pytest.mark.parametrize("which", ["lite0", "resnet18"])
def test_gradcampp_matches_where_eps_is_negligible(which, lite0, resnet18, photos):
    """Scaling the head's logits by 1000 makes g^2 >> 1e-6: the eps-free formula then agrees."""
    base, name, get_layer = _models(lite0, resnet18, which)
    head = base._fc if which == "lite0" else base.fc
    with torch.no_grad():
        head.weight.mul_(1000)
        head.bias.mul_(1000)
    reference_model = copy.deepcopy(base)
    theirs = reference_maps("gradcampp", reference_model, get_layer(reference_model), photos)
    ours = CamEngine(copy.deepcopy(base)).explain(photos, [[t] for t in TARGETS], method="gradcam++", layers=name)
    np.testing.assert_allclose(minmax_normalize(ours.maps).numpy(), theirs, atol=3e-3)


def test_guided_backprop_matches_reference_per_image(resnet18):
    torch.manual_seed(1)
    x = torch.randn(3, 3, 64, 64)
    targets = [3, 7, 500]
    ours = CamEngine(copy.deepcopy(resnet18)).explain(x, [[t] for t in targets], method="guided-gradcam")
    assert ours.guided is not None and ours.guided.shape == (3, 3, 64, 64)
    reference = GuidedBackpropReLUModel(copy.deepcopy(resnet18), device="cpu")
    cam_model = copy.deepcopy(resnet18)
    for i, t in enumerate(targets):
        gb = reference(x[i : i + 1].clone(), target_category=t)  # [H, W, 3]
        with GradCAM(cam_model, [cam_model.layer4]) as cam:
            grayscale = cam(x[i : i + 1], targets=[ClassifierOutputTarget(t)])[0]  # [H, W] in [0, 1]
        expected = gb * grayscale[..., None]
        mine = ours.guided[i].permute(1, 2, 0).numpy()
        scale = np.abs(expected).max()
        assert scale > 0
        np.testing.assert_allclose(mine / scale, expected / scale, atol=2e-3)
