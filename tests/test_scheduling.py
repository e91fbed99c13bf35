"""Fair under mixed load: cheap work runs between the chunks of heavy work, answers leave as soon as they are ready,
priority orders each lane, and load is counted in forward-equivalents (camserve.batching, camserve.plan)."""

from __future__ import annotations

import asyncio
import itertools
import time

import numpy as np
import pytest

from camserve.batching import BatchQueue, TorchThread
from camserve.cam.pauses import pause
from camserve.cam.reruns import EngineReruns
from camserve.errors import OverloadedError
from tests.apphelpers import metric, running_app

pytestmark = pytest.mark.anyio


class Recorder:
    """A batch function over string payloads: 'heavy:N' runs N chunks (pausing before each), others run at once."""

    def __init__(self, chunk_s: float = 0.02) -> None:
        self.events: list[str] = []
        self.chunk_s = chunk_s

    def __call__(self, payloads, staged, deliver):
        outputs = []
        for index, payload in enumerate(payloads):
            if payload.startswith("heavy"):
                for chunk in range(int(payload.split(":")[1])):
                    pause()
                    time.sleep(self.chunk_s)
                    self.events.append(f"{payload}#{chunk}")
            else:
                self.events.append(payload)
            deliver(index, payload)
            outputs.append(payload)
        return outputs


@pytest.fixture
def thread():
    owner = TorchThread()
    yield owner
    owner.close()


def _queue(compute, thread, **options) -> BatchQueue:
    options.setdefault("max_batch_size", 4)
    options.setdefault("max_queue", 64)
    queue = BatchQueue("m", compute, thread, **options)
    queue.start()
    return queue


async def test_cheap_work_runs_between_the_chunks_of_heavy_work_and_heavy_work_finishes(thread):
    """Documented order: the heavy batch pauses before each chunk and one cheap batch that arrived meanwhile runs
    there; under a steady stream of cheap requests the heavy request still finishes, one chunk per cheap batch."""
    recorder = Recorder(chunk_s=0.03)
    queue = _queue(recorder, thread, max_batch_size=2)
    (heavy,) = queue.submit(["heavy:6"], heavy=True, costs=[600])
    cheap = []
    for n in range(10):  # a steady stream: two cheap requests every 20 ms
        await asyncio.sleep(0.02)
        cheap += queue.submit([f"cheap{2 * n}", f"cheap{2 * n + 1}"])
    assert await asyncio.wait_for(heavy, 10) == "heavy:6"
    await asyncio.gather(*cheap)
    await queue.close()
    chunks = [i for i, event in enumerate(recorder.events) if event.startswith("heavy")]
    assert len(chunks) == 6 and all(f"heavy:6#{n}" == recorder.events[i] for n, i in enumerate(chunks))
    between = [recorder.events[a + 1 : b] for a, b in itertools.pairwise(chunks)]
    assert all(len(cheap_batch) <= 2 for cheap_batch in between)  # at most one cheap batch between two chunks
    assert sum(len(cheap_batch) for cheap_batch in between) >= 6  # and cheap work did run in between


async def test_heavy_work_starts_and_finishes_when_cheap_work_never_stops_waiting(thread):
    """Closed-loop cheap clients keep the cheap lane non-empty at every batch start: heavy work starts after a
    cheap batch anyway, and runs the cheap batches at its pauses."""
    recorder = Recorder(chunk_s=0.01)
    queue = _queue(recorder, thread, max_batch_size=2)
    stop = asyncio.Event()

    async def client(name: str) -> int:
        sent = 0
        while not stop.is_set():
            (answer,) = queue.submit([f"{name}{sent}"])
            sent += 1
            await answer
        return sent

    clients = [asyncio.create_task(client(name)) for name in ("a", "b", "c")]
    await asyncio.sleep(0.05)
    (heavy,) = queue.submit(["heavy:5"], heavy=True, costs=[500])
    assert await asyncio.wait_for(heavy, 5) == "heavy:5"
    stop.set()
    counts = await asyncio.gather(*clients)
    await queue.close()
    assert min(counts) > 5  # cheap work ran all along


async def test_a_cheap_request_behind_heavy_work_waits_at_most_one_chunk(thread):
    recorder = Recorder(chunk_s=0.1)
    queue = _queue(recorder, thread)
    (heavy,) = queue.submit(["heavy:20"], heavy=True, costs=[2000])  # 2 s of chunks
    await asyncio.sleep(0.15)
    started = time.perf_counter()
    (cheap,) = queue.submit(["predict"])
    await asyncio.wait_for(cheap, 5)
    waited = time.perf_counter() - started
    assert not heavy.done() and waited < 0.35  # one chunk (0.1 s) and scheduling, not the 2 s of heavy work
    await asyncio.wait_for(heavy, 10)
    await queue.close()


class Exclusive(Recorder):
    """A Recorder that notes how many chunks ran at once, across threads (must never exceed one)."""

    def __init__(self, chunk_s: float = 0.02) -> None:
        super().__init__(chunk_s)
        self.running = self.most = 0

    def __call__(self, payloads, staged, deliver):
        outputs = []
        for index, payload in enumerate(payloads):
            if payload == "heavy-fails":
                pause()
                raise RuntimeError("this heavy batch fails")
            if not payload.startswith("heavy"):
                self.events.append(payload)
            else:
                for chunk in range(int(payload.split(":")[1])):
                    pause()
                    self.running += 1
                    self.most = max(self.most, self.running)
                    time.sleep(self.chunk_s)
                    self.events.append(f"{payload}#{chunk}")
                    self.running -= 1
            deliver(index, payload)
            outputs.append(payload)
        return outputs


async def test_a_heavy_request_behind_another_waits_at_most_one_chunk_and_they_take_turns(thread):
    """A short heavy request submitted while a long one runs joins it at its next pause: they alternate chunk by
    chunk, so the short one is answered long before the long one, and only one chunk ever runs at a time."""
    recorder = Exclusive(chunk_s=0.05)
    queue = _queue(recorder, thread)
    (long,) = queue.submit(["heavy:20"], heavy=True, costs=[2000])  # 1 s of chunks
    await asyncio.sleep(0.12)
    started = time.perf_counter()
    (short,) = queue.submit(["heavy:3"], heavy=True, costs=[300])
    assert await asyncio.wait_for(short, 5) == "heavy:3"
    waited = time.perf_counter() - started
    assert not long.done() and waited < 0.9  # its 3 chunks and 3-4 of the long one's, not the whole second
    assert await asyncio.wait_for(long, 10) == "heavy:20"
    await queue.close()
    events = recorder.events
    joined = events.index("heavy:3#0")
    assert events[joined - 1].startswith("heavy:20#") and events[joined + 1].startswith("heavy:20#")
    assert events[joined + 2] == "heavy:3#1" and events[joined + 4] == "heavy:3#2"  # round robin, one chunk each
    assert recorder.most == 1 and queue.pending_work == 0


async def test_heavy_batches_share_with_cheap_ones_and_at_most_max_heavy_turns_take_turns(thread, monkeypatch):
    """With two turns at most, a third heavy request waits in its lane until one of the two is done; cheap work
    still runs at every pause, and a heavy batch that fails answers its own items with the error only."""
    from camserve import batching

    monkeypatch.setattr(batching, "MAX_HEAVY_TURNS", 2)
    recorder = Exclusive(chunk_s=0.03)
    queue = _queue(recorder, thread, max_batch_size=1)
    (first,) = queue.submit(["heavy:40"], heavy=True, costs=[4000])  # 1.2 s of chunks: the others join it
    await asyncio.sleep(0.05)
    (second,) = queue.submit(["heavy:3"], heavy=True, costs=[300])
    (third,) = queue.submit(["heavy:2"], heavy=True, costs=[200])
    (failing,) = queue.submit(["heavy-fails"], heavy=True, costs=[100])
    cheap = queue.submit(["cheap0"]) + queue.submit(["cheap1"])
    assert await asyncio.gather(*cheap) == ["cheap0", "cheap1"]
    assert await asyncio.wait_for(asyncio.gather(first, second, third), 10) == ["heavy:40", "heavy:3", "heavy:2"]
    with pytest.raises(RuntimeError, match="this heavy batch fails"):
        await failing
    await queue.close()
    events = recorder.events
    assert events.index("heavy:2#0") > events.index("heavy:3#2")  # the third joined once the second left
    assert events.index("cheap1") < events.index("heavy:40#10") and recorder.most == 1
    assert queue.pending_work == 0 and queue.in_flight == 0


async def test_another_models_work_waits_for_one_ring_not_for_heavy_work_that_never_stops(thread):
    """Every model's queue shares the torch thread: heavy batches join a ring only while its first one runs, so a
    steady stream of heavy work on one model leaves the thread to another model's requests after that ring."""
    busy, other = Exclusive(chunk_s=0.02), Exclusive()
    loaded, quiet = _queue(busy, thread, max_batch_size=1), _queue(other, thread)
    stop = asyncio.Event()

    async def heavy_client(n: int) -> None:
        while not stop.is_set():
            (answer,) = loaded.submit([f"heavy:5-{n}"[:7]], heavy=True, costs=[500])
            await answer

    clients = [asyncio.create_task(heavy_client(n)) for n in range(4)]
    await asyncio.sleep(0.1)
    (answer,) = quiet.submit(["predict"])
    assert await asyncio.wait_for(answer, 3) == "predict"  # after one ring (at most 4 x 5 chunks of 20 ms)
    stop.set()
    await asyncio.gather(*clients)
    await loaded.close()
    await quiet.close()
    assert busy.most == 1 and loaded.pending_work == 0


async def test_heavy_work_whose_thread_cannot_start_runs_after_the_ring(thread, monkeypatch):
    """At a thread limit, a heavy batch that cannot get a thread of its own goes back to the head of its lane and
    runs after the current heavy batch, answered as ever."""
    import threading

    start = threading.Thread.start

    def no_heavy_threads(self: threading.Thread) -> None:
        if self.name.startswith("camserve-heavy-"):
            raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", no_heavy_threads)
    recorder = Exclusive(chunk_s=0.02)
    queue = _queue(recorder, thread)
    (first,) = queue.submit(["heavy:6"], heavy=True, costs=[600])
    await asyncio.sleep(0.05)
    (second,) = queue.submit(["heavy:2"], heavy=True, costs=[200])
    assert await asyncio.wait_for(asyncio.gather(first, second), 10) == ["heavy:6", "heavy:2"]
    await queue.close()
    assert recorder.events.index("heavy:2#0") > recorder.events.index("heavy:6#5")
    assert queue.pending_work == 0 and queue.in_flight == 0


async def test_an_item_is_answered_when_its_own_work_is_done_not_at_the_end_of_the_batch(thread):
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()

    def compute(payloads, staged, deliver):
        deliver(0, "first")
        time.sleep(0.3)  # the rest of the batch takes a while
        return ["first", "second"]

    queue = _queue(compute, thread)
    first, second = queue.submit(["a", "b"])
    first.add_done_callback(lambda _f: loop.call_soon(gate.set))
    await asyncio.wait_for(gate.wait(), 2)
    assert first.result() == "first" and not second.done()
    assert await second == "second"
    await queue.close()


async def test_priority_orders_each_lane_and_unknown_levels_are_refused(thread):
    recorder = Recorder()
    release = asyncio.Event()

    def blocked(payloads, staged, deliver):
        if payloads == ["block"]:
            while not release.is_set():
                time.sleep(0.01)
        return recorder(payloads, staged, deliver)

    queue = _queue(blocked, thread, max_batch_size=1)
    futures = queue.submit(["block"])
    await asyncio.sleep(0.05)
    futures += queue.submit(["low"], priority=3) + queue.submit(["normal"]) + queue.submit(["high"], priority=1)
    with pytest.raises(ValueError, match="priority must be one of"):
        queue.submit(["x"], priority=7)
    release.set()
    await asyncio.gather(*futures)
    await queue.close()
    assert recorder.events == ["block", "high", "normal", "low"]


async def test_heavy_work_beyond_its_limit_is_refused_while_cheap_work_still_fits(thread):
    queue = _queue(Recorder(chunk_s=0.05), thread, max_heavy_work=1000)
    (first,) = queue.submit(["heavy:10"], heavy=True, costs=[800])
    with pytest.raises(OverloadedError, match="holds 800 forward-equivalents of heavy work \\(limit 1000\\)"):
        queue.submit(["heavy:1"], heavy=True, costs=[300])
    assert queue.pending_work == 800
    (cheap,) = queue.submit(["predict"])
    assert await asyncio.wait_for(cheap, 5) == "predict"
    await first
    await queue.close()
    estimate = queue.estimate_s(100)  # measured: 10 chunks of 50 ms for 800 forwards, ~0.06 s per 100
    assert queue.pending_work == 0 and estimate is not None and 0.03 < estimate < 0.6


# -- through the service ----------------------------------------------------------------------------------------
LAYER = "_blocks.3"  # 40 channels: Score-CAM there runs 40 masked forwards


@pytest.fixture
def slow_reruns(registry, monkeypatch):
    """Score-CAM's masked forwards in chunks of 4, each 100 ms slower: 10 chunks of about 0.2 s."""
    original = EngineReruns.logits

    def slow(self, inputs):
        time.sleep(0.1)
        return original(self, inputs)

    monkeypatch.setattr(EngineReruns, "logits", slow)
    monkeypatch.setattr(registry.get().engine._reruns, "batch_size", 4)
    return registry.get().engine.trace().channels(LAYER)


async def test_a_predict_behind_a_score_cam_is_answered_first_and_the_work_gauge_counts_forwards(
    registry, cat_jpeg, slow_reruns
):
    jpeg = {"content-type": "image/jpeg"}
    scorecam = f"/explain?method=scorecam&layer={LAYER}"
    async with running_app(registry, max_batch_size=8) as (client, _app):
        started = time.perf_counter()
        heavy = asyncio.create_task(client.post(scorecam, content=cat_jpeg, headers=jpeg))
        await asyncio.sleep(0.6)  # the Score-CAM is running its chunks
        gauge = metric((await client.get("/metrics")).text, "camserve_pending_forwards", model="efficientnet-lite0")
        sent = time.perf_counter()
        predict = await client.post("/predict", content=cat_jpeg, headers=jpeg)
        predict_s = time.perf_counter() - sent
        assert predict.status_code == 200 and not heavy.done()
        ablation = await client.post("/explain?method=ablationcam", content=cat_jpeg, headers=jpeg)
        assert ablation.status_code == 200 and not heavy.done()  # cheap near the head: between two chunks
        assert (await heavy).status_code == 200
        heavy_s = time.perf_counter() - started
        after = metric((await client.get("/metrics")).text, "camserve_pending_forwards", model="efficientnet-lite0")
    assert gauge == 1 + slow_reruns  # the forward, and one masked forward per channel of the layer
    assert predict_s < 0.6 < heavy_s and after == 0  # about one chunk, not the rest of the Score-CAM


async def test_a_short_heavy_request_behind_a_score_cam_is_answered_before_it(registry, cat_jpeg, slow_reruns):
    """Faithfulness scores (heavy: their perturbed forwards run in chunks) sent while a Score-CAM runs take turns
    with it instead of waiting for all of it."""
    jpeg = {"content-type": "image/jpeg"}
    async with running_app(registry) as (client, _app):
        heavy = asyncio.create_task(
            client.post(f"/explain?method=scorecam&layer={LAYER}", content=cat_jpeg, headers=jpeg)
        )
        await asyncio.sleep(0.5)  # the Score-CAM is running its chunks (about 2 s of them)
        scored = await client.post(
            "/explain?method=gradcam&faithfulness=true&faithfulness_steps=2", content=cat_jpeg, headers=jpeg
        )
        assert scored.status_code == 200, scored.text
        assert not heavy.done()  # answered while the Score-CAM still runs, not after it
        assert (await heavy).status_code == 200
    assert scored.json()["results"][0]["explanations"][0]["faithfulness"]["steps"] == 2


async def test_a_503_counts_work_and_priority_is_one_option_every_way_in(registry, cat_jpeg, slow_reruns):
    jpeg = {"content-type": "image/jpeg"}
    cost = 1 + slow_reruns
    limits = {"max_masked_forwards": 50, "max_faithfulness_forwards": 50, "max_heavy_forwards": cost + 10}
    scorecam = f"/explain?method=scorecam&layer={LAYER}"
    async with running_app(registry, **limits) as (client, _app):
        first = asyncio.create_task(client.post(scorecam, content=cat_jpeg, headers=jpeg))
        await asyncio.sleep(0.4)
        second = await client.post(scorecam + "&priority=1", content=cat_jpeg, headers=jpeg)
        cheap = await client.post("/explain?method=gradcam", content=cat_jpeg, headers=jpeg)
        bad = await client.post("/predict?priority=7", content=cat_jpeg, headers=jpeg)
        bad_v2 = await client.post(
            "/v2/models/efficientnet-lite0/infer",
            json={
                "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}],
                "parameters": {"priority": 7},
            },
        )
        assert (await first).status_code == 200
    assert second.status_code == 503 and second.headers["retry-after"]
    words = f"{cost} forward-equivalents of heavy work (limit {cost + 10}); this request adds {cost}"
    assert words in second.json()["detail"]
    assert cheap.status_code == 200
    assert bad.status_code == bad_v2.status_code == 422
    assert bad.json()["detail"] == bad_v2.json()["error"] == "priority: Input should be less than or equal to 3"


async def test_heavy_work_that_would_outlast_the_timeout_is_refused_at_once(registry, cat_jpeg, slow_reruns):
    """Once a Score-CAM has been timed, one that cannot finish within the request timeout gets a 503 at once
    instead of a 504 after the timeout."""
    jpeg = {"content-type": "image/jpeg"}
    scorecam = f"/explain?method=scorecam&layer={LAYER}"
    async with running_app(registry, request_timeout_s=1.0) as (client, app):
        first = await client.post(scorecam, content=cat_jpeg, headers=jpeg)  # about 2 s of chunks: times out
        queue = app.state.service.queues["efficientnet-lite0"]
        while queue.pending_work:  # the abandoned batch still finishes (and is timed)
            await asyncio.sleep(0.05)
        started = time.perf_counter()
        second = await client.post(scorecam, content=cat_jpeg, headers=jpeg)
        refused_s = time.perf_counter() - started
        cheap = await client.post("/explain?method=gradcam", content=cat_jpeg, headers=jpeg)
    assert first.status_code == 504
    assert second.status_code == 503 and refused_s < 0.5 and int(second.headers["retry-after"]) >= 1
    assert "past the request timeout of 1 s" in second.json()["detail"]
    assert cheap.status_code == 200


async def test_a_gradient_map_computed_between_heavy_chunks_equals_the_same_map_alone(registry, cat_jpeg, slow_reruns):
    """Cheap work runs inside a heavy batch's pauses, on the same thread: its maps must not notice."""
    jpeg = {"content-type": "image/jpeg"}
    gradcam = "/explain?method=gradcampp&raw=true&target=281&target=285"
    async with running_app(registry) as (client, _app):
        alone = (await client.post(gradcam, content=cat_jpeg, headers=jpeg)).json()
        heavy = asyncio.create_task(
            client.post(f"/explain?method=scorecam&layer={LAYER}", content=cat_jpeg, headers=jpeg)
        )
        await asyncio.sleep(0.6)
        between = (await client.post(gradcam, content=cat_jpeg, headers=jpeg)).json()
        assert not heavy.done()
        assert (await heavy).status_code == 200
    for a, b in zip(alone["results"][0]["explanations"], between["results"][0]["explanations"], strict=True):
        assert a["index"] == b["index"] and a["heatmap"] == b["heatmap"]
        assert np.allclose(np.asarray(a["cam"]), np.asarray(b["cam"]), atol=1e-6)


def test_a_rerun_after_the_layer_is_measured_as_a_fraction_of_a_forward():
    """Ablation-CAM's and ReciproCAM's reruns run only the network after the layer: measured, not assumed."""
    import torch
    from torch import nn

    from camserve.cam.engine import CamEngine

    torch.manual_seed(0)
    deep = nn.Sequential(*[nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()) for _ in range(8)])
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), deep, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    example = torch.rand(1, 3, 64, 64)
    near_head = CamEngine(model.eval(), default_layer="1")  # after it: pooling and the classifier
    near_input = CamEngine(model.eval(), default_layer="0")  # after it: nearly everything
    near_head.trace(example), near_input.trace(example)
    head_fraction, input_fraction = near_head.suffix_fraction(example), near_input.suffix_fraction(example)
    assert 0.001 <= head_fraction < 0.05 and head_fraction < input_fraction <= 1.0
    assert input_fraction > 0.5


def test_ablation_and_reciprocam_near_the_head_are_cheap_work_and_count_their_measured_cost(registry, cat_jpeg):
    from camserve.options import ExplainOptions
    from camserve.plan import ImagePayload, InferenceRequest, make_plan
    from camserve.settings import Settings

    served = registry.get()
    assert 0.001 <= served.rerun_fraction < 0.05  # Lite0's _swish: pooling and the classifier after it

    def plan(**explain):
        request = InferenceRequest([ImagePayload(cat_jpeg, "image/jpeg")], explain=ExplainOptions(**explain))
        return make_plan(request, registry, Settings())

    channels = served.engine.trace().channels("_swish")
    ablation, recipro = plan(method="ablationcam"), plan(method="reciprocam")
    assert not ablation.heavy and ablation.cost == 1 + int(np.ceil(channels * served.rerun_fraction))
    assert not recipro.heavy and recipro.cost == 1 + int(np.ceil(49 * served.rerun_fraction))
    early = plan(method="ablationcam", layer=["_blocks.15"])  # not measured there: whole forwards
    assert early.heavy and early.cost == 1 + served.engine.trace().channels("_blocks.15")
    assert plan(method="scorecam").heavy and plan(method="gradcam", faithfulness=True).heavy
    assert not plan(method="gradcampp").heavy
