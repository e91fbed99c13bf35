"""The CUDA serving path, simulated on the CPU: JPEG decoding inside the batch on the torch thread, device memory
bounds, out-of-memory as a retryable 503, and a sticky device error turning readiness and liveness off.

A "fake CUDA" model is the real default model whose `device` says cuda; nvJPEG is faked by torchvision's CPU
decoder (recording each call and its thread), and the worker's `preprocess` keeps tensors on the CPU.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import threading
import time

import numpy as np
import pytest
import torch
import torchvision.io
from PIL import Image

import camserve.batches as worker_module
from camserve.batches import ExplainPlan, ModelBatches, WorkItem, _chunks
from camserve.batching import BatchQueue, TorchThread
from camserve.device_faults import as_service_error, is_sticky_device_error
from camserve.errors import DeviceFailedError, DeviceMemoryError, OverloadedError
from camserve.images import EncodedJpeg
from camserve.models import ModelRegistry
from tests.apphelpers import running_app
from tests.conftest import jpeg_bytes

pytestmark = pytest.mark.anyio
ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be reported later"


def png_bytes(photo: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def nvjpeg_calls(monkeypatch) -> list[tuple[int, str]]:
    """Pretend CUDA and nvJPEG exist; record (images, thread name) per decode call."""
    calls: list[tuple[int, str]] = []
    real = torchvision.io.decode_image

    def fake_decode_jpeg(inputs, mode=None, device="cpu", apply_exif_orientation=False):
        assert torch.device(device).type == "cuda" and mode == torchvision.io.ImageReadMode.RGB
        calls.append((len(inputs), threading.current_thread().name))
        return [real(data, mode=torchvision.io.ImageReadMode.RGB) for data in inputs]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", fake_decode_jpeg)
    return calls


@pytest.fixture
def cuda_registry(registry, nvjpeg_calls, monkeypatch) -> ModelRegistry:
    """The default model as if it were served on CUDA (its engine still computes on the CPU)."""
    served = registry.get()
    real_preprocess = worker_module.preprocess
    monkeypatch.setattr(worker_module, "preprocess", lambda *a, **k: real_preprocess(*a, **{**k, "device": "cpu"}))
    return ModelRegistry([dataclasses.replace(served, device=torch.device("cuda"))], served.name)


@pytest.fixture
def batches(monkeypatch) -> list[list[object]]:
    """What each computed batch held as model inputs (`WorkItem.pixels`)."""
    seen: list[list[object]] = []
    real = ModelBatches.compute

    def spy(self, batch, *staged):
        seen.append([item.pixels for item in batch])
        return real(self, batch, *staged)

    monkeypatch.setattr(ModelBatches, "compute", spy)
    return seen


# -- item 1: JPEGs decode inside the batch, on the torch thread --------------------------------------------
async def test_jpegs_are_decoded_in_the_batch_on_the_torch_thread(
    registry, cuda_registry, nvjpeg_calls, batches, chelsea, cat_jpeg, coffee_jpeg
):
    cat, mug, small_png = cat_jpeg, coffee_jpeg, png_bytes(chelsea[:100, :120])
    uploads = [cat, mug, cat, small_png]
    answers = {}
    for name, models in (("cpu", registry), ("cuda", cuda_registry)):
        async with running_app(models, max_wait_ms=300) as (client, _app):
            responses = await asyncio.gather(
                *(
                    client.post("/explain?raw=true", content=data, headers={"content-type": "image/*"})
                    for data in uploads
                )
            )
        assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
        answers[name] = [r.json()["results"][0] for r in responses]
    jpegs_per_batch = [sum(isinstance(p, EncodedJpeg) for p in batch) for batch in batches]
    cuda_batches = [n for n in jpegs_per_batch if n]
    # one nvJPEG call per batch that holds JPEGs, for all of them, on the torch thread; the PNG decoded on the CPU
    assert [n for n, _ in nvjpeg_calls] == cuda_batches and sum(cuda_batches) == 3
    assert {thread for _, thread in nvjpeg_calls} == {"camserve-torch_0"}
    for cpu, cuda in zip(answers["cpu"], answers["cuda"], strict=True):
        assert (cpu["width"], cpu["height"]) == (cuda["width"], cuda["height"])
        assert [p["index"] for p in cpu["predictions"]] == [p["index"] for p in cuda["predictions"]]
        np.testing.assert_allclose(
            np.array(cuda["explanations"][0]["cam"]), np.array(cpu["explanations"][0]["cam"]), atol=2e-3, rtol=2e-2
        )


async def test_a_corrupt_jpeg_in_a_gpu_batch_fails_alone(cuda_registry, nvjpeg_calls, cat_jpeg):
    """A JPEG whose header passes but whose data is broken: its request gets 400, the others of the batch 200."""
    good = cat_jpeg
    broken = good[: len(good) // 2]
    async with running_app(cuda_registry, max_wait_ms=300) as (client, _app):
        responses = await asyncio.gather(
            *(
                client.post("/predict", content=data, headers={"content-type": "image/jpeg"})
                for data in (good, broken, good)
            )
        )
    assert [r.status_code for r in responses] == [200, 400, 200], [r.text for r in responses]
    assert "truncated or corrupt" in responses[1].json()["detail"]


def test_decode_calls_split_a_batch_by_the_pixel_budget():
    assert _chunks([0, 1, 2, 3], [10, 10, 10, 10], budget=25) == [[0, 1], [2, 3]]
    assert _chunks([5, 6, 7], [30, 5, 5], budget=25) == [[5], [6, 7]]  # a large image goes alone
    assert _chunks([], [], budget=25) == []


# -- item 5: device memory bounded, out-of-memory retryable ------------------------------------------------
async def test_a_40_megapixel_image_never_reaches_the_device_at_full_size(cuda_registry, nvjpeg_calls, monkeypatch):
    """40 MP: decoded and resized on the CPU, queued as a model-size float input, never given to nvJPEG; a 2 MP
    JPEG is queued encoded and resized right after decoding, so preprocess only ever sees model-size inputs."""
    huge = Image.new("RGB", (8000, 5000), (200, 40, 30))
    huge.paste((20, 40, 200), (2000, 1000, 6000, 4000))
    buffer = io.BytesIO()
    huge.save(buffer, format="JPEG", quality=60)
    two_mp = jpeg_bytes(np.asarray(huge.resize((1800, 1125))))
    del huge
    queued: list[object] = []
    real_submit = BatchQueue.submit
    monkeypatch.setattr(
        BatchQueue,
        "submit",
        lambda self, items, **lane: (queued.extend(i.pixels for i in items), real_submit(self, items, **lane))[1],
    )
    preprocessed: list[tuple[torch.dtype, tuple[int, ...]]] = []
    patched_preprocess = worker_module.preprocess

    def spy_preprocess(images, *args, **kwargs):
        preprocessed.extend((x.dtype, tuple(x.shape)) for x in images)
        return patched_preprocess(images, *args, **kwargs)

    monkeypatch.setattr(worker_module, "preprocess", spy_preprocess)
    async with running_app(cuda_registry) as (client, _app):
        for data in (buffer.getvalue(), two_mp):
            response = await client.post("/predict", content=data, headers={"content-type": "image/jpeg"})
            assert response.status_code == 200, response.text
    big_input, two_mp_input = queued
    assert isinstance(big_input, torch.Tensor) and big_input.dtype == torch.float32
    assert tuple(big_input.shape) == (3, 224, 224) and big_input.device.type == "cpu"
    assert isinstance(two_mp_input, EncodedJpeg) and (two_mp_input.width, two_mp_input.height) == (1800, 1125)
    assert [n for n, _ in nvjpeg_calls] == [1]  # only the 2 MP JPEG went to the (fake) GPU decoder
    assert preprocessed == [(torch.float32, (3, 224, 224))] * 2


async def test_out_of_memory_is_a_retryable_503_and_the_worker_goes_on(registry, cat_jpeg, monkeypatch):
    engine = registry.get().engine
    real_explain = engine.explain
    raised = []

    def explain_once_oom(*args, **kwargs):
        if not raised:
            raised.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 600.00 MiB")
        return real_explain(*args, **kwargs)

    monkeypatch.setattr(engine, "explain", explain_once_oom)
    async with running_app(registry) as (client, _app):
        first = await client.post("/explain", content=cat_jpeg, headers={"content-type": "image/jpeg"})
        second = await client.post("/explain", content=cat_jpeg, headers={"content-type": "image/jpeg"})
        ready = await client.get("/health/ready")
    assert first.status_code == 503 and first.headers["retry-after"] == "1"
    assert "out of memory" in first.json()["detail"]
    assert second.status_code == 200 and second.json()["results"][0]["explanations"]
    assert ready.status_code == 200  # out of memory is not fatal


def test_device_errors_are_worded_as_domain_errors():
    oom = as_service_error(torch.OutOfMemoryError("CUDA out of memory"))
    assert isinstance(oom, DeviceMemoryError) and isinstance(oom, OverloadedError) and oom.retry_after_s == 1
    assert oom.__traceback__ is None and oom.__context__ is None  # holds none of the failed batch's tensors
    for message in (
        ILLEGAL_ACCESS,
        "CUDA error: device-side assert triggered",
        "CUDA error: unspecified launch failure (cudaErrorLaunchFailure)",
    ):
        assert is_sticky_device_error(RuntimeError(message))
        assert isinstance(as_service_error(RuntimeError(message)), DeviceFailedError)
    assert is_sticky_device_error(torch.AcceleratorError(ILLEGAL_ACCESS))
    for other in (RuntimeError("shape mismatch"), ValueError(ILLEGAL_ACCESS), torch.OutOfMemoryError(ILLEGAL_ACCESS)):
        assert not is_sticky_device_error(other)
    plain = RuntimeError("shape mismatch")
    assert as_service_error(plain) is plain


# -- item 6: a sticky device error turns readiness and liveness off -----------------------------------------
async def test_a_sticky_device_error_fails_readiness_and_liveness_logged_once(registry, cat_jpeg, monkeypatch, caplog):
    engine = registry.get().engine

    def broken(*args, **kwargs):
        raise torch.AcceleratorError(ILLEGAL_ACCESS)

    monkeypatch.setattr(engine, "explain", broken)
    monkeypatch.setattr(engine, "predict", broken)
    caplog.set_level(logging.INFO, logger="camserve")
    async with running_app(registry) as (client, _app):
        assert (await client.get("/health/live")).status_code == 200
        failures = [
            await client.post(route, content=cat_jpeg, headers={"content-type": "image/jpeg"})
            for route in ("/explain", "/predict", "/explain")
        ]
        ready, live = await client.get("/health/ready"), await client.get("/health/live")
        v2_live, v2_ready = await client.get("/v2/health/live"), await client.get("/v2/health/ready")
    assert [r.status_code for r in failures] == [503] * 3
    assert "must restart" in failures[0].json()["detail"]
    assert ready.status_code == 503 and live.status_code == 503 and v2_live.status_code == 503 == v2_ready.status_code
    assert "illegal memory access" in live.json()["detail"] and "restart" in ready.json()["detail"]
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and "illegal memory access" in critical[0].getMessage()


def test_lifecycle_broken_is_final_and_logged_once(caplog):
    from camserve.lifecycle import Lifecycle, Phase

    phases: list[Phase] = []
    lifecycle = Lifecycle(on_change=phases.append)
    lifecycle.loaded()
    assert lifecycle.is_ready and lifecycle.is_alive
    with caplog.at_level(logging.CRITICAL, logger="camserve"):
        lifecycle.broken(RuntimeError(ILLEGAL_ACCESS))
        lifecycle.broken(RuntimeError("CUDA error: device-side assert triggered"))
    lifecycle.drain()  # shutting down does not make a broken instance look healthy again
    assert phases == [Phase.READY, Phase.BROKEN] and lifecycle.phase is Phase.BROKEN
    assert not lifecycle.is_ready and not lifecycle.is_alive
    assert "illegal memory access" in lifecycle.not_ready_reason() and len(caplog.records) == 1


# -- item 7: one device-to-host copy per tensor per batch ---------------------------------------------------
def test_a_batch_copies_each_result_tensor_to_the_host_once(registry, chelsea, coffee, monkeypatch):
    """Four explain items (top-1, two classes, top-1, and a predict item riding along): probabilities and maps
    come to the host once each, the classes from the engine's host-side pair plan, and each image's maps equal
    the engine's rows for it."""
    served = registry.get()
    photos = [torch.from_numpy(np.ascontiguousarray(p.transpose(2, 0, 1))) for p in (chelsea, coffee)]
    options = ExplainPlan(method="gradcam", layers=None, counterfactual=False)
    items = [
        WorkItem(photos[0], options, None),
        WorkItem(photos[1], options, [504, 967]),
        WorkItem(photos[1], None, None),
        WorkItem(photos[0], options, None),
    ]
    copies: list[tuple[int, ...]] = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        copies.append(tuple(self.shape))
        return real_cpu(self, *args, **kwargs)

    batches = ModelBatches(served, max_batch_size=8)
    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    outputs = batches.compute(items)
    monkeypatch.undo()
    assert sorted(copies) == [(4, 7, 7), (4, 1000)]  # probabilities and maps once each; classes from the host plan
    assert [o.classes for o in outputs[:2]] + [outputs[3].classes] == [[285], [504, 967], [285]]
    assert outputs[2].maps is None and outputs[2].classes == []
    x = worker_module.preprocess(photos, served.input_size, served.mean, served.std, interpolation=served.interpolation)
    direct = served.engine.explain(x, [None, [504, 967]], method="gradcam")
    torch.testing.assert_close(outputs[0].maps, direct.maps[0:1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outputs[1].maps, direct.maps[1:3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outputs[3].maps, outputs[0].maps, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outputs[2].probabilities, torch.softmax(direct.logits[1], dim=0), atol=1e-5, rtol=1e-4)


# -- item 7: preparing batch n+1 while batch n computes ---------------------------------------------------------
@pytest.mark.anyio
@pytest.mark.parametrize("staging_fails", [False, True])
async def test_a_backlog_stages_the_next_batch_during_compute(registry, chelsea, coffee, monkeypatch, staging_fails):
    """Under a backlog the worker takes batch n+1 while batch n computes and stages its images (pinned memory on
    CUDA; a copy here) on another thread; the staged inputs are what batch n+1 computes on, and the results equal
    a direct forward. A staging failure only costs the head start."""
    served = registry.get()
    photos = [torch.from_numpy(np.ascontiguousarray(p.transpose(2, 0, 1))) for p in (chelsea, coffee)] * 3
    stages: list[tuple[str, float]] = []  # (thread, when)
    computes: list[tuple[float, float, bool]] = []  # (start, end, had staged inputs)
    observed: list[tuple[int, int]] = []
    real_compute = ModelBatches.compute

    def stage(images):
        stages.append((threading.current_thread().name, time.perf_counter()))
        if staging_fails:
            raise RuntimeError("no pinned memory")
        return [None if x is None else x.clone() for x in images]

    batches = ModelBatches(served, max_batch_size=2)

    def compute(batch, staged, deliver):
        started = time.perf_counter()
        time.sleep(0.3)  # long enough for the loop to take and stage the next batch
        observed.append((queue.in_flight, queue.depth))
        computes.append((started, time.perf_counter(), bool(staged and staged[0] is not None)))
        return real_compute(batches, batch, staged, deliver)

    monkeypatch.setattr(worker_module, "stage_pinned", stage)
    thread = TorchThread()
    queue = BatchQueue("m", compute, thread, max_batch_size=2, max_queue=16, stage=batches.stage, overlap=True)
    queue.start()
    futures = queue.submit([WorkItem(p, None, None) for p in photos])
    outputs = await asyncio.gather(*futures)
    await queue.close()
    thread.close()
    assert len(stages) == 2 and len(computes) == 3
    assert all(thread != "camserve-torch" for thread, _ in stages)
    for (_, staged_at), (_, running_until, _) in zip(stages, computes, strict=False):
        assert staged_at < running_until  # batch n+1 was staged while batch n was still computing
    assert [had for _, _, had in computes] == [False, not staging_fails, not staging_fails]
    assert observed[0] == (4, 2)  # 2 computing + 2 staged ahead; 2 still queued
    x = worker_module.preprocess(photos[:2], served.input_size, served.mean, served.std, interpolation="bilinear")
    expected = torch.softmax(served.engine.predict(x), dim=1)
    for i, output in enumerate(outputs):
        torch.testing.assert_close(output.probabilities, expected[i % 2], atol=1e-5, rtol=1e-4)


def test_overlap_is_on_by_default_only_for_cuda_models(registry):
    from camserve.inference import InferenceService
    from camserve.settings import Settings

    served = registry.get()
    on_cuda = dataclasses.replace(served, device=torch.device("cuda"))
    for model, overlap in ((served, False), (on_cuda, True)):
        service = InferenceService(type(registry)([model], model.name), Settings())
        assert service.queues[model.name]._overlap is overlap
        service.thread.close()
