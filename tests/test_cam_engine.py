"""Engine behaviour on the real pretrained EfficientNet-Lite0 and on ResNet-18."""

from __future__ import annotations

import copy
import gc
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from camserve.cam import CamEngine, UnknownLayerError
from camserve.cam.capture import ActivationCapture
from camserve.cam.layouts import FeatureLayout
from camserve.cam.render import minmax_normalize
from tests.conftest import to_lite_input

EGYPTIAN_CAT, ESPRESSO = 285, 967


@pytest.fixture(scope="module")
def cat_and_coffee(chelsea: np.ndarray, coffee: np.ndarray) -> torch.Tensor:
    """One real photo with two objects: the cat on the left, the coffee cup on the right."""
    left = F.interpolate(torch.from_numpy(chelsea).permute(2, 0, 1)[None].float(), size=(224, 224))
    right = F.interpolate(torch.from_numpy(coffee).permute(2, 0, 1)[None].float(), size=(224, 224))
    side_by_side = torch.cat([left, right], dim=3)[0].permute(1, 2, 0).round().byte().numpy()
    return to_lite_input(side_by_side, size=224)


def test_default_layers_are_found_automatically(lite0, resnet18, chelsea):
    x = to_lite_input(chelsea)
    lite = CamEngine(lite0)
    lite.explain(x)
    assert lite.default_layer == "_swish"  # the head's ReLU6: its 2nd call feeds global pooling
    assert lite.trace().calls["_swish"] == 2
    res = CamEngine(resnet18)
    res.explain(x)
    assert res.default_layer == "layer4"


def test_default_layer_uses_the_last_call_of_a_reused_module(lite0, chelsea):
    """`_swish` runs after the stem (112x112) and after the head (7x7): the head's call is used."""
    result = CamEngine(lite0).explain(to_lite_input(chelsea))
    assert result.maps.shape == (1, 7, 7)
    assert int(result.class_index[0]) == EGYPTIAN_CAT


def test_unknown_layer_lists_candidates(lite0, chelsea):
    engine = CamEngine(lite0)
    with pytest.raises(UnknownLayerError, match="candidates: .*_blocks") as info:
        engine.explain(to_lite_input(chelsea), layers="_block.15")
    assert "_blocks.15" in info.value.candidates


def test_batch_equals_one_by_one_with_mixed_targets(lite0, chelsea, coffee):
    engine = CamEngine(lite0)
    x = torch.cat([to_lite_input(chelsea), to_lite_input(coffee), to_lite_input(chelsea[:, ::-1].copy())])
    targets = [[EGYPTIAN_CAT, 281], None, [ESPRESSO]]
    batch = engine.explain(x, targets, method="gradcampp")
    assert batch.image_index.tolist() == [0, 0, 1, 2]
    assert batch.class_index.tolist()[:2] == [EGYPTIAN_CAT, 281]
    assert batch.class_index.tolist()[3] == ESPRESSO
    assert batch.class_index[2] == batch.logits[1].argmax()
    for row, (image, target) in enumerate(zip(batch.image_index.tolist(), batch.class_index.tolist(), strict=True)):
        single = engine.explain(x[image : image + 1], [[target]], method="gradcampp")
        torch.testing.assert_close(batch.maps[row], single.maps[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batch.logits[image], single.logits[0], rtol=1e-4, atol=1e-4)
    # predictions and maps come from the same forward: the logits equal a plain predict
    torch.testing.assert_close(batch.logits, engine.predict(x), rtol=1e-4, atol=1e-4)


def test_two_classes_in_one_photo_point_at_their_objects(lite0, cat_and_coffee):
    result = CamEngine(lite0).explain(cat_and_coffee, [[EGYPTIAN_CAT, ESPRESSO]], method="gradcam")
    cat_map, cup_map = result.maps
    width = cat_map.shape[1]
    assert cat_map[:, : width // 2].sum() > 2 * cat_map[:, width // 2 :].sum()
    assert cup_map[:, width // 2 :].sum() > 2 * cup_map[:, : width // 2].sum()


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam"])
def test_counterfactual_differs_from_plain(lite0, cat_and_coffee, method):
    engine = CamEngine(lite0)
    plain = engine.explain(cat_and_coffee, [[EGYPTIAN_CAT]], method=method).maps[0]
    counter = engine.explain(cat_and_coffee, [[EGYPTIAN_CAT]], method=method, counterfactual=True).maps[0]
    assert plain.max() > 0
    assert not torch.allclose(minmax_normalize(plain[None]), minmax_normalize(counter[None]), atol=0.05)


def test_randomized_head_changes_the_map(lite0, chelsea):
    """Adebayo et al. sanity check: the map depends on the classifier's weights."""
    x = to_lite_input(chelsea)
    before = CamEngine(copy.deepcopy(lite0)).explain(x, [[EGYPTIAN_CAT]], method="gradcam").maps[0]
    randomized = copy.deepcopy(lite0)
    torch.manual_seed(0)
    torch.nn.init.normal_(randomized._fc.weight, std=0.01)
    after = CamEngine(randomized).explain(x, [[EGYPTIAN_CAT]], method="gradcam").maps[0]
    assert spearmanr(before.flatten().numpy(), after.flatten().numpy()).statistic < 0.5


def test_multi_layer_fusion(lite0, chelsea):
    engine = CamEngine(lite0)
    x = to_lite_input(chelsea)
    layers = ["_blocks.10", "_swish"]
    fused = engine.explain(x, layers=layers, method="gradcam")
    assert fused.layers == tuple(layers)
    assert fused.layer_maps["_blocks.10"].shape == (1, 14, 14)
    assert fused.maps.shape == (1, 14, 14)
    coarse = F.interpolate(minmax_normalize(fused.layer_maps["_swish"])[:, None], size=(14, 14), mode="bilinear")
    expected = (minmax_normalize(fused.layer_maps["_blocks.10"]) + coarse[:, 0]) / 2
    torch.testing.assert_close(fused.maps, expected)
    single = engine.explain(x, layers="_blocks.10", method="gradcam")
    torch.testing.assert_close(single.maps, fused.layer_maps["_blocks.10"], rtol=1e-4, atol=1e-6)


def test_guided_gradcam_is_batched(resnet18):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    engine = CamEngine(resnet18)
    batch = engine.explain(x, [[1], [2]], method="guided-gradcam")
    assert batch.maps.shape == (2, 64, 64)
    for i in range(2):
        single = engine.explain(x[i : i + 1], [[i + 1]], method="guided-gradcam")
        torch.testing.assert_close(batch.guided[i], single.guided[0], rtol=1e-4, atol=1e-7)
    assert batch.maps[1].abs().sum() > 0


def test_no_parameter_gradients_and_no_hooks_left(lite0, chelsea):
    engine = CamEngine(lite0)
    x = to_lite_input(chelsea)
    for method in ["gradcam", "gradcampp", "guided-gradcam"]:
        engine.explain(x, method=method, layers=["_blocks.14", "_swish"])
    assert all(p.grad is None and not p.requires_grad for p in lite0.parameters())
    for module in lite0.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks
    result = engine.explain(x)
    assert not result.maps.requires_grad and result.maps.grad_fn is None
    assert result.logits.grad_fn is None


def test_explain_inside_inference_mode_still_works(lite0, chelsea):
    engine = CamEngine(lite0)
    with torch.inference_mode():
        maps = engine.explain(to_lite_input(chelsea)).maps
    assert maps.max() > 0


def test_concurrent_callers_never_share_activations(lite0, resnet18, chelsea, coffee):
    engine = CamEngine(lite0)
    x = torch.cat([to_lite_input(chelsea), to_lite_input(coffee)])
    jobs = [("gradcam", "_swish"), ("gradcampp", "_blocks.12"), ("layercam", "_blocks.8"), ("hirescam", "_swish")]
    expected = {job: engine.explain(x, method=job[0], layers=job[1]).maps for job in jobs}
    failures: list[str] = []
    barrier = threading.Barrier(len(jobs))

    def worker(job):
        barrier.wait()
        for _ in range(5):
            got = engine.explain(x, method=job[0], layers=job[1]).maps
            if got.shape != expected[job].shape or not torch.allclose(got, expected[job], atol=1e-5):
                failures.append(str(job))

    threads = [threading.Thread(target=worker, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_memory_does_not_grow_over_10000_calls():
    """A tiny model so 10,000 explain calls run in seconds; no tensors or hooks accumulate."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )
    engine = CamEngine(model)
    x = torch.randn(2, 3, 8, 8)
    engine.explain(x)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))

    baseline = live_tensors()
    for i in range(10_000):
        engine.explain(x, method="gradcampp" if i % 2 else "gradcam")
    assert live_tensors() <= baseline
    assert not any(m._forward_hooks for m in model.modules())


def test_capture_ignores_other_threads(resnet18):
    """A capture registered on one thread does not record a forward run by another thread."""
    layouts = {"layer4": FeatureLayout("nchw", (1, 1))}
    capture = ActivationCapture({"layer4": resnet18.layer4}, {"layer4": 1}, layouts)
    with capture, torch.no_grad():
        t = threading.Thread(target=lambda: resnet18(torch.randn(1, 3, 32, 32)))
        t.start()
        t.join()
    assert capture.activations == {}
