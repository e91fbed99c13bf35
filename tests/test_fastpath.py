"""The compiled fast path: the same logits and maps as the eager engine, for every method and batch size."""

from __future__ import annotations

import copy
import logging

import pytest
import timm
import torch
from torch import nn

from camserve.cam import CamEngine
from camserve.cam.fastpath import CompiledSplit
from camserve.cam.render import minmax_normalize
from camserve.cam.split import SplitError, export_model, split_model
from camserve.models import runtimes
from camserve.models.runtimes import choose_runtime

METHODS = ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "guided-gradcam"]
MAX_BATCH = 16


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One inductor cache for this module's compilations (a second compile of a graph is then a cache hit)."""
    runtimes.set_inductor_cache(tmp_path_factory.mktemp("cache"))


def compiled(engine: CamEngine) -> CompiledSplit:
    """The compiled split an engine serves every batch size through."""
    backend = engine.backend_for(1)
    assert isinstance(backend, CompiledSplit)
    return backend


def _pair(model: nn.Module, example: torch.Tensor, **engine_args: object) -> tuple[CamEngine, CamEngine]:
    """(compiled engine, eager engine) over two copies of `model`."""
    eager = CamEngine(copy.deepcopy(model), **engine_args)
    eager.trace(example)
    fast = CamEngine(model, **engine_args)
    fast.trace(example)
    fast.use_fast_path(fast.compile(example, max_batch=MAX_BATCH))
    return fast, eager


@pytest.fixture(scope="module")
def lite0_engines(lite0_pristine: nn.Module) -> tuple[CamEngine, CamEngine]:
    return _pair(copy.deepcopy(lite0_pristine), torch.zeros(1, 3, 224, 224))


@pytest.fixture(scope="module")
def resnet_engines() -> tuple[CamEngine, CamEngine]:
    import torchvision

    torch.manual_seed(0)
    return _pair(torchvision.models.resnet18().eval(), torch.zeros(1, 3, 160, 160))


def _images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_same(fast: CamEngine, eager: CamEngine, images: torch.Tensor, **explain_args: object) -> None:
    a = fast.explain(images, **explain_args)
    b = eager.explain(images, **explain_args)
    assert a.pairs == b.pairs
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    assert (minmax_normalize(a.maps) - minmax_normalize(b.maps)).abs().max().item() <= 1e-4
    assert b.maps.amax().item() > 0  # the comparison is between real maps


@pytest.mark.parametrize("engines", ["lite0_engines", "resnet_engines"])
@pytest.mark.parametrize("batch", [1, 3, 13])
@pytest.mark.parametrize("method", METHODS)
def test_compiled_maps_equal_eager(engines: str, batch: int, method: str, request: pytest.FixtureRequest) -> None:
    fast, eager = request.getfixturevalue(engines)
    size = 224 if engines == "lite0_engines" else 160
    assert eager.runtime is None
    _assert_same(fast, eager, _images(batch, size, seed=batch), method=method)
    assert compiled(fast).eager_calls == 0  # every batch size up to MAX_BATCH was compiled in warm-up


def test_compiled_predict_equals_eager(lite0_engines: tuple[CamEngine, CamEngine], chelsea) -> None:
    from tests.conftest import to_lite_input

    fast, eager = lite0_engines
    images = torch.cat([to_lite_input(chelsea), _images(4, 224)])
    compiled = fast.predict(images)
    reference = eager.predict(images)
    torch.testing.assert_close(compiled, reference, atol=1e-4, rtol=1e-4)
    assert compiled[0].argmax().item() == reference[0].argmax().item() == 285  # Egyptian cat


def test_targets_counterfactual_and_other_layers(lite0_engines: tuple[CamEngine, CamEngine]) -> None:
    fast, eager = lite0_engines
    images = _images(3, 224, seed=7)
    _assert_same(fast, eager, images, targets=[[281, 285], None, [1]], method="gradcampp")
    _assert_same(fast, eager, images, method="layercam", counterfactual=True)
    # a layer other than the fast path's, and a fusion with it, run eagerly and still agree
    _assert_same(fast, eager, images, method="gradcam", layers=["_blocks.10"])
    _assert_same(fast, eager, images, method="layercam", layers=["_blocks.10", "_swish"])


def test_every_batch_size_was_compiled_in_warm_up(resnet_engines: tuple[CamEngine, CamEngine]) -> None:
    fast, _eager = resnet_engines
    for batch in range(1, MAX_BATCH + 1):
        fast.predict(_images(batch, 160, seed=batch))
    assert compiled(fast).eager_calls == 0


def test_an_input_warm_up_did_not_compile_runs_eagerly(
    resnet_engines: tuple[CamEngine, CamEngine], caplog: pytest.LogCaptureFixture
) -> None:
    """No request waits for a compiler: an input needing a new graph (here another image size, which the worker
    never sends) runs eagerly, with the same results."""
    fast, eager = resnet_engines
    before = compiled(fast).eager_calls
    with caplog.at_level(logging.WARNING):
        _assert_same(fast, eager, _images(2, 128), method="gradcam")
    assert compiled(fast).eager_calls > before


def test_score_cam_masked_forwards_run_compiled(
    resnet_engines: tuple[CamEngine, CamEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Score-CAM's masked batches (32 inputs, beyond the worker's batch of 16) go through the compiled graph,
    which warm-up compiled for them, and give the eager engine's maps."""
    fast, eager = resnet_engines
    backend = compiled(fast)
    assert backend.max_batch == 32
    batches: list[int] = []
    compiled_logits = backend.logits
    monkeypatch.setattr(backend, "logits", lambda x: batches.append(x.shape[0]) or compiled_logits(x))
    before = backend.eager_calls
    _assert_same(fast, eager, _images(1, 160, seed=5), method="scorecam")
    assert batches.count(32) >= 10 and 1 in batches  # the masked chunks and the all-zero baseline
    assert backend.eager_calls == before


def test_token_model_with_carried_values() -> None:
    """A timm DeiT (two prefix tokens) splits at its last block's input norm: the residual stream is carried."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10).eval()
    example = torch.zeros(1, 3, 224, 224)
    fast, eager = _pair(model, example)
    assert compiled(fast).layer == "blocks.11.norm1"
    assert compiled(fast).split.carried >= 1
    for method in ("gradcam", "layercam"):
        _assert_same(fast, eager, _images(3, 224), method=method)


def test_bfloat16_compiled_within_autocast_tolerance() -> None:
    import torchvision

    torch.manual_seed(0)
    example = torch.zeros(1, 3, 160, 160)
    fast, eager = _pair(torchvision.models.resnet18().eval(), example, autocast_dtype=torch.bfloat16)
    images = _images(3, 160)
    a = fast.explain(images, method="gradcam")
    b = eager.explain(images, method="gradcam")
    assert a.pairs == b.pairs
    difference = (minmax_normalize(a.maps) - minmax_normalize(b.maps)).abs()
    assert difference.mean().item() < 0.02 and difference.max().item() < 0.15  # docs/methods.md: bf16 map tolerance


class Branchy(nn.Module):
    """Control flow on data: torch.export refuses it, so the model is served eagerly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        if y.mean() > 0:
            y = y * 2
        return self.fc(y.mean(dim=(2, 3)))


class Plain(Branchy):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_split_halves_give_the_model_logits() -> None:
    torch.manual_seed(0)
    model = Plain().eval()
    x = torch.randn(3, 3, 8, 8)
    split = split_model(export_model(model, torch.zeros(2, 3, 8, 8)), "conv")
    activation, *carried = split.prefix(x)
    torch.testing.assert_close(activation, model.conv(x))
    torch.testing.assert_close(split.suffix(activation, *carried), model(x))
    with pytest.raises(SplitError, match="runs no operation"):
        split_model(export_model(model, torch.zeros(2, 3, 8, 8)), "missing")


class Tiny(nn.Module):
    """conv -> bn -> relu (the default layer) -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def test_a_cut_in_the_wrong_place_is_caught(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Equal logits do not prove the cut: compile compares the split's activation with the hooked layer's."""
    import dataclasses

    from camserve.cam import engine as engine_module

    torch.manual_seed(0)
    engine = CamEngine(Tiny().eval(), default_layer="relu")
    example = torch.zeros(1, 3, 16, 16)
    engine.trace(example)
    assert engine.compile(example, max_batch=4).layer == "relu"  # the true cut passes
    wrong = lambda graph, layer: dataclasses.replace(split_model(graph, "bn"), layer=layer)  # noqa: E731
    monkeypatch.setattr(engine_module, "split_model", wrong)
    with pytest.raises(SplitError, match="differs from the layer's output"):
        engine.compile(example, max_batch=4)
    choice = choose_runtime(
        "tiny", engine, example, mode="compiled", max_batch=4, warmup=True, cache_dir=tmp_path, measure_compiled=True
    )
    assert "differs from the layer's output" in choice.not_used["compiled"] and engine.runtime is None
