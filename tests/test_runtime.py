"""The runtime layer: ONNX Runtime gives the eager logits and maps, and `auto` serves only what it measured faster."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

from camserve.batches import ExplainPlan, ItemOutput, ModelBatches, WorkItem
from camserve.cam import CamEngine, reruns
from camserve.cam.render import minmax_normalize
from camserve.cam.runtime import Bucket, OnnxRuntimeSplit, RuntimeTable, export_onnx, time_alternating
from camserve.cam.split import SplitError, carried_kinds
from camserve.models import runtimes
from camserve.models.runtimes import choose_runtime
from tests.camhelpers import seeded

GRADIENT_METHODS = ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam"]


def onnx_pair(model: nn.Module, example: torch.Tensor, folder: Path) -> tuple[CamEngine, CamEngine]:
    """(engine serving every batch through ONNX Runtime, eager engine) over two copies of `model`."""
    eager = CamEngine(copy.deepcopy(model))
    eager.trace(example)
    engine = CamEngine(model)
    engine.trace(example)
    split = engine.split(example)
    export_onnx(split, example, folder / "prefix.onnx")
    backend = OnnxRuntimeSplit(split, folder / "prefix.onnx", device=engine.device, threads=torch.get_num_threads())
    engine.check_backend(backend, example)
    engine.use_fast_path(backend)
    return engine, eager


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_same(
    engine: CamEngine, eager: CamEngine, x: torch.Tensor, map_tolerance: float = 1e-4, **explain_args: object
) -> None:
    a = engine.explain(x, **explain_args)
    b = eager.explain(x, **explain_args)
    assert a.pairs == b.pairs
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    assert (minmax_normalize(a.maps) - minmax_normalize(b.maps)).abs().max().item() <= map_tolerance
    assert b.maps.amax().item() > 0  # the comparison is between real maps


class Counting:
    """Counts the batches a backend's prefix runs."""

    def __init__(self, engine: CamEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        backend = engine.backend_for(1)
        assert isinstance(backend, OnnxRuntimeSplit)
        self.sizes: list[int] = []
        prefix = backend.prefix
        monkeypatch.setattr(backend, "prefix", lambda x: self.sizes.append(x.shape[0]) or prefix(x))


@pytest.fixture(scope="module")
def lite0_onnx(lite0_pristine: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[CamEngine, CamEngine]:
    return onnx_pair(copy.deepcopy(lite0_pristine), torch.zeros(1, 3, 224, 224), tmp_path_factory.mktemp("lite0"))


@pytest.fixture(scope="module")
def resnet_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[CamEngine, CamEngine]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    return onnx_pair(model, torch.zeros(1, 3, 160, 160), tmp_path_factory.mktemp("resnet"))


@pytest.mark.parametrize("engines", ["lite0_onnx", "resnet_onnx"])
@pytest.mark.parametrize("batch", [1, 3, 13])
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_onnxruntime_maps_equal_eager(engines: str, batch: int, method: str, request: pytest.FixtureRequest) -> None:
    engine, eager = request.getfixturevalue(engines)
    size = 224 if engines == "lite0_onnx" else 160
    assert eager.runtime is None and engine.backend_for(batch) is not None
    assert_same(engine, eager, images(batch, size, seed=batch), method=method)


def test_onnxruntime_predicts_the_eager_logits_on_a_photo(lite0_onnx: tuple[CamEngine, CamEngine], chelsea) -> None:
    from tests.conftest import to_lite_input

    engine, eager = lite0_onnx
    x = torch.cat([to_lite_input(chelsea), images(12, 224)])
    served, reference = engine.predict(x), eager.predict(x)
    torch.testing.assert_close(served, reference, atol=1e-4, rtol=1e-4)
    assert served[0].argmax().item() == reference[0].argmax().item() == 285  # Egyptian cat


@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "eigencam", "guided-gradcam"])
def test_every_method_family_runs_on_onnxruntime(
    resnet_onnx: tuple[CamEngine, CamEngine], method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Perturbation and guided methods give the eager maps; Score-CAM's masked forwards (32 at a time, beyond the
    worker's batches) run on ONNX Runtime too."""
    engine, eager = resnet_onnx
    counted = Counting(engine, monkeypatch)
    assert_same(engine, eager, images(1, 160, seed=4), method=method)
    assert counted.sizes[0] == 1  # the explanation's own forward
    if method == "scorecam":
        assert counted.sizes.count(32) >= 10  # the masked forwards, 32 inputs each


def test_targets_counterfactual_fusion_and_other_layers(
    lite0_onnx: tuple[CamEngine, CamEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the split layer the prefix runs on ONNX Runtime; any other layer, or a fusion, runs the hooked eager
    model, and all agree with eager."""
    engine, eager = lite0_onnx
    x = images(3, 224, seed=7)
    counted = Counting(engine, monkeypatch)
    assert_same(engine, eager, x, targets=[[281, 285], None, [1]], method="gradcampp")
    assert_same(engine, eager, x, method="layercam", counterfactual=True)
    assert counted.sizes == [3, 3]
    assert_same(engine, eager, x, method="gradcam", layers=["_blocks.10"])
    assert_same(engine, eager, x, method="layercam", layers=["_blocks.10", "_swish"])
    assert counted.sizes == [3, 3]  # neither went through the split


def hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    from tests.camhelpers import Logits

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, num_labels=5)
    return seeded(Logits(ViTForImageClassification(config)))


def token_model(which: str) -> tuple[nn.Module, int]:
    """(model, input side) with seeded random weights."""
    torch.manual_seed(0)
    if which == "timm_deit_tiny":
        return seeded(timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10)), 224
    if which == "hf_vit":
        return hf_vit(), 224
    small = torchvision.models.VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    return seeded(small), 32


@pytest.mark.parametrize("which", ["timm_deit_tiny", "hf_vit", "torchvision_vit"])
def test_transformers_on_onnxruntime_equal_eager(which: str, tmp_path: Path) -> None:
    """Token models split with carried values at odd batch sizes: DeiT carries the residual stream and the batch
    size; torchvision's ViT also batch x heads and batch x tokens, which are sizes, not tensors."""
    model, side = token_model(which)
    example = torch.zeros(1, 3, side, side)
    engine, eager = onnx_pair(model, example, tmp_path)
    backend = engine.backend_for(1)
    assert isinstance(backend, OnnxRuntimeSplit) and backend.split.carried >= 1
    if which == "torchvision_vit":
        assert {"batch*2", "batch*17"} <= set(carried_kinds(backend.split))  # 2 heads, 1 + 16 tokens
    for batch in (1, 3):
        for method in ("gradcam", "gradcampp", "layercam"):
            assert_same(engine, eager, images(batch, side, seed=batch), method=method)
    # the suffix's reruns get those sizes too; Ablation-CAM's weights are differences of nearly equal scores, which
    # magnify the prefix's ~5e-6 differences (DeiT: 1.1e-4 after normalising)
    assert_same(engine, eager, images(2, side), map_tolerance=1e-3, method="ablationcam")
    x = images(13, side)
    torch.testing.assert_close(engine.predict(x), eager.predict(x), atol=1e-4, rtol=1e-4)


# -- choosing ---------------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


class Branchy(Tiny):
    """Control flow on data: torch.export refuses it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(x))
        if y.mean() > 0:
            y = y * 2
        return self.fc(y.mean(dim=(2, 3)))


def tiny_engine(model: nn.Module | None = None) -> tuple[CamEngine, torch.Tensor]:
    torch.manual_seed(0)
    engine = CamEngine((model or Tiny()).eval())
    example = torch.zeros(1, 3, 32, 32)
    engine.trace(example)
    return engine, example


def choose(engine: CamEngine, example: torch.Tensor, cache: Path, **kwargs: object) -> runtimes.RuntimeChoice:
    arguments: dict[str, object] = {"mode": "auto", "max_batch": 8, "warmup": True, "cache_dir": cache} | kwargs
    return choose_runtime("m", engine, example, **arguments)  # type: ignore[arg-type]


def test_auto_serves_each_bucket_on_the_measured_fastest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager is made slow on purpose: ONNX Runtime serves every bucket, and the split, the graph and the decision
    are stored and reused by a restart without exporting or timing again."""
    engine, example = tiny_engine()
    predict_eager = engine.predict_eager
    monkeypatch.setattr(engine, "predict_eager", lambda x: time.sleep(0.02) or predict_eager(x))
    choice = choose(engine, example, tmp_path)
    assert [(b.largest, b.backend) for b in choice.buckets] == [(1, "onnxruntime"), (8, "onnxruntime")]
    assert all(b.ms["eager"] > b.ms["onnxruntime"] for b in choice.buckets) and not choice.from_cache
    assert isinstance(engine.backend_for(5), OnnxRuntimeSplit)

    again, example = tiny_engine()
    monkeypatch.setattr(again, "split", lambda *a: pytest.fail("split again"))
    monkeypatch.setattr(reruns, "export_model", lambda *a: pytest.fail("exported for reruns"))
    monkeypatch.setattr(runtimes, "export_onnx", lambda *a: pytest.fail("exported again"))
    monkeypatch.setattr(runtimes, "time_alternating", lambda *a, **k: pytest.fail("timed again"))
    cached = choose(again, example, tmp_path)
    assert cached.from_cache and cached.buckets == choice.buckets
    assert isinstance(again.backend_for(1), OnnxRuntimeSplit)
    assert_same(again, engine, images(3, 32), method="gradcampp")
    assert_same(again, engine, images(2, 32), method="ablationcam")  # reruns through the cached split


def test_a_backend_slower_than_eager_is_never_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, example = tiny_engine()
    logits = OnnxRuntimeSplit.logits
    monkeypatch.setattr(OnnxRuntimeSplit, "logits", lambda self, x: time.sleep(0.02) or logits(self, x))
    choice = choose(engine, example, tmp_path)
    assert [b.backend for b in choice.buckets] == ["eager", "eager"]
    assert all(b.ms["onnxruntime"] > b.ms["eager"] for b in choice.buckets)
    assert engine.runtime is None and engine.backend_for(1) is None


def test_one_slow_bucket_stays_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime made slow only at batch 1: that bucket is eager, the larger one is not."""
    engine, example = tiny_engine()
    logits = OnnxRuntimeSplit.logits
    predict_eager = engine.predict_eager
    monkeypatch.setattr(OnnxRuntimeSplit, "logits", lambda s, x: time.sleep(0.03 * (x.shape[0] == 1)) or logits(s, x))
    monkeypatch.setattr(engine, "predict_eager", lambda x: time.sleep(0.01) or predict_eager(x))
    choice = choose(engine, example, tmp_path)
    assert [b.backend for b in choice.buckets] == ["eager", "onnxruntime"]
    assert engine.backend_for(1) is None and isinstance(engine.backend_for(2), OnnxRuntimeSplit)
    assert isinstance(engine.backend_for(32), OnnxRuntimeSplit)  # beyond the last bucket: the last bucket's


def test_a_model_that_does_not_export_is_served_eagerly_saying_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine, example = tiny_engine(Branchy())
    with caplog.at_level(logging.INFO):
        choice = choose(engine, example, tmp_path)
    assert choice.buckets == [] and engine.runtime is None
    assert "does not export" in choice.not_used["onnxruntime"]
    assert "model m: onnxruntime not used: the model does not export" in caplog.text
    assert engine.explain(images(2, 32), method="gradcam").maps.shape == (2, 32, 32)


def test_a_backend_that_does_not_match_eager_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, example = tiny_engine()
    logits = OnnxRuntimeSplit.logits
    monkeypatch.setattr(OnnxRuntimeSplit, "logits", lambda self, x: logits(self, x) + 0.01)
    choice = choose(engine, example, tmp_path)
    assert "logits differ from eager by 0.01" in choice.not_used["onnxruntime"]
    assert engine.runtime is None


def test_a_graph_that_fails_to_export_to_onnx_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise SplitError("the prefix does not export to ONNX (ValueError: unsupported operator)")

    monkeypatch.setattr(runtimes, "export_onnx", refuse)
    engine, example = tiny_engine()
    choice = choose(engine, example, tmp_path)
    assert choice.not_used == {"onnxruntime": "the prefix does not export to ONNX (ValueError: unsupported operator)"}
    assert engine.runtime is None


def test_eager_mode_and_no_warm_up_build_nothing(tmp_path: Path) -> None:
    engine, example = tiny_engine()
    assert choose(engine, example, tmp_path, mode="eager").summary == "eager"
    choice = choose(engine, example, tmp_path, warmup=False)
    assert "warm-up is off" in choice.not_used["onnxruntime"] and engine.runtime is None
    assert not (tmp_path / "runtime").exists()


def test_compiled_without_a_compiler_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    engine, example = tiny_engine()
    choice = choose(engine, example, tmp_path, mode="compiled")
    assert "no C++ compiler" in choice.not_used["compiled"] and engine.runtime is None


def test_runtime_table_buckets() -> None:
    table = RuntimeTable("x", [Bucket(1, "eager"), Bucket(8, "a"), Bucket(16, "b")], {"a": "A", "b": "B"})  # type: ignore[dict-item]
    assert [table.for_batch(n) for n in (1, 2, 8, 9, 16, 17, 64)] == [None, "A", "A", "B", "B", "B", "B"]


def test_timing_alternates_and_stops_early_only_for_a_clear_winner() -> None:
    calls: list[str] = []

    def sleeper(name: str, seconds: float):
        return lambda x: calls.append(name) or time.sleep(seconds)

    x = torch.zeros(1)
    ms = time_alternating({"slow": sleeper("slow", 0.02), "fast": sleeper("fast", 0.001)}, x)
    assert ms["slow"] > 10 * ms["fast"]
    assert calls == ["slow", "fast"] * 3  # one untimed call each, then two rounds in turns: clear
    calls.clear()
    time_alternating({"a": sleeper("a", 0.005), "b": sleeper("b", 0.005)}, x)
    assert len(calls) == 2 * 6  # no clear winner: all five rounds
    calls.clear()
    time_alternating({"a": sleeper("a", 0.05), "b": sleeper("b", 0.05)}, x, budget_s=0.15)
    assert len(calls) == 2 * 3  # two rounds spent the budget: no more


# -- the service --------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_service_with_runtime_auto_reports_and_serves_the_eager_answers(registry, cat_jpeg, tmp_path) -> None:
    """The default configuration (CAMSERVE_RUNTIME=auto) builds ONNX Runtime for the embedded model, reports
    each bucket in /models, and answers as the eager registry does."""
    from camserve.images import decode_image, preprocess
    from tests.apphelpers import running_app

    eager = registry.get()
    async with running_app(None, runtime="auto", runtime_build="blocking", cache_dir=tmp_path) as (client, app):
        listed = (await client.get("/models")).json()["models"][0]["runtime"]
        served = app.state.service.registry.get()
        files = [("image", ("cat.jpg", cat_jpeg, "image/jpeg"))]
        explained = await client.post("/explain", params={"method": "gradcampp", "raw": "true"}, files=files)
        predicted = await client.post("/predict", files=files)
    assert listed["mode"] == "auto" and listed["layer"] == "_swish" and listed["not_used"] == {}
    assert not listed["building"]  # runtime_build=blocking: chosen before readiness
    assert [b["batch_sizes"] for b in listed["buckets"]] == [[1, 1], [2, 8], [9, 16]]
    assert all(set(b["ms"]) == {"eager", "onnxruntime"} for b in listed["buckets"])
    assert [b["backend"] for b in listed["buckets"]] == [b.backend for b in served.runtime.buckets]
    assert (tmp_path / "runtime").is_dir()
    assert explained.status_code == predicted.status_code == 200, explained.text
    x = preprocess([decode_image(cat_jpeg).pixels], eager.input_size, eager.mean, eager.std)
    direct = eager.engine.explain(x, method="gradcampp")
    cam = np.array(explained.json()["results"][0]["explanations"][0]["cam"])
    reference = direct.maps[0].numpy()
    np.testing.assert_allclose(cam / cam.max(), reference / reference.max(), atol=1e-4)
    top = predicted.json()["results"][0]["predictions"][0]
    assert top["index"] == 285
    assert abs(top["score"] - torch.softmax(direct.logits, 1)[0, 285].item()) < 1e-4


def test_prepare_times_inductor_even_where_serve_decided_without_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A decision `serve` stored (ONNX Runtime and eager only) does not stop `camserve prepare` from timing
    inductor: prepare builds every candidate and times again."""
    engine, example = tiny_engine()
    assert not choose(engine, example, tmp_path).from_cache
    again, example = tiny_engine()
    assert choose(again, example, tmp_path).from_cache  # serve again: read
    monkeypatch.setattr(runtimes, "cxx_compiler", lambda: None)
    prepared, example = tiny_engine()
    choice = choose(prepared, example, tmp_path, measure_compiled=True)
    assert not choice.from_cache and "no C++ compiler" in choice.not_used["compiled"]
    assert "onnxruntime" in choice.buckets[0].ms


def test_a_backend_failing_while_serving_falls_back_to_eager_saying_so_once(
    lite0_onnx: tuple[CamEngine, CamEngine], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A runtime fault at serve time (here the session raises) never fails a request eager torch can answer:
    predictions, maps and Score-CAM's masked forwards run eagerly, and one warning says why."""
    engine, eager = lite0_onnx
    backend = engine.backend_for(1)
    assert backend is not None and engine.runtime is not None

    def broken(x: torch.Tensor) -> object:
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : simulated")

    monkeypatch.setattr(backend, "prefix", broken)
    monkeypatch.setattr(backend, "logits", broken)
    monkeypatch.setattr(engine.runtime, "failures", {})
    x = images(2, 224, seed=3)
    with caplog.at_level(logging.WARNING):
        torch.testing.assert_close(engine.predict(x), eager.predict(x))
        assert_same(engine, eager, x, method="gradcampp")
        assert_same(engine, eager, x[:1], method="scorecam")
    assert engine.runtime.failures["onnxruntime"] >= 3
    warnings = [r.getMessage() for r in caplog.records if "onnxruntime failed" in r.getMessage()]
    assert warnings == [
        "layer _swish: onnxruntime failed (RuntimeError: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : "
        "simulated); such calls run eagerly"
    ]


# -- torch's threads beside ONNX Runtime ----------------------------------------------------------------------------


def test_torch_takes_one_thread_where_onnxruntime_runs_the_forwards_and_all_where_torch_does(
    lite0_onnx: tuple[CamEngine, CamEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, eager = lite0_onnx
    monkeypatch.setattr(engine, "threads", 3)
    assert engine.torch_threads() == 1  # predictions and methods that read no layer: whole forwards on the runtime
    assert engine.torch_threads(("_swish",), "gradcampp") == 1 == engine.torch_threads(("_swish", "_swish"))
    assert engine.torch_threads(("_blocks.10",)) == 3  # the hooked eager forward
    assert engine.torch_threads(("_swish", "_blocks.10")) == 3  # fusion
    assert engine.torch_threads(None, "guided-gradcam") == 3  # guided backpropagation through the whole model
    assert eager.torch_threads() == eager.threads  # no runtime
    backend = engine.backend_for(1)
    assert backend is not None and engine.runtime is not None
    mixed = RuntimeTable("_swish", [Bucket(1, "onnxruntime"), Bucket(1 << 30, "eager")], {"onnxruntime": backend})
    monkeypatch.setattr(engine, "runtime", mixed)  # a bucket served eagerly: torch may run whole forwards
    assert engine.torch_threads() == 3


@pytest.mark.parametrize("busy", [True, False])
def test_a_batch_on_onnxruntime_runs_torch_on_one_thread_while_the_host_is_busy_and_gives_the_threads_back(
    lite0_onnx: tuple[CamEngine, CamEngine], registry, chelsea, monkeypatch: pytest.MonkeyPatch, busy: bool
) -> None:
    """Predict-only, the default layer and another layer: torch's thread count inside each engine call, and after
    (also after a failing call); with no other request decoding or rendering, torch keeps all its threads."""
    engine, _ = lite0_onnx
    before = torch.get_num_threads()
    full = before + 1  # not the count already set, so keeping it is seen
    monkeypatch.setattr(engine, "threads", full)
    served = dataclasses.replace(registry.get(), engine=engine)
    seen: list[int] = []
    for name in ("predict", "explain"):
        real = getattr(engine, name)
        monkeypatch.setattr(
            engine, name, lambda *a, real=real, **k: seen.append(torch.get_num_threads()) or real(*a, **k)
        )
    photo = torch.from_numpy(np.ascontiguousarray(chelsea.transpose(2, 0, 1)))
    batches = ModelBatches(served, max_batch_size=8, host_busy=lambda: busy)
    for options in (None, ExplainPlan("gradcampp", None, False), ExplainPlan("gradcampp", ("_blocks.10",), False)):
        outputs = batches.compute([WorkItem(photo, options, None)] * 2)
        assert [o.classes for o in outputs] == ([[], []] if options is None else [[285], [285]])  # Egyptian cat
        assert torch.get_num_threads() == before
    assert seen == ([1, 1, full] if busy else [full, full, full])

    def failing(*args: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        raise RuntimeError("simulated")

    monkeypatch.setattr(engine, "explain", failing)
    failed = batches.compute([WorkItem(photo, ExplainPlan("gradcampp", None, False), None)])
    assert not isinstance(failed[0], ItemOutput) and seen[-1] == (1 if busy else full)
    assert torch.get_num_threads() == before
