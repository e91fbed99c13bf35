"""A first start is ready at once, serving eagerly, and switches each model to its runtime once a child process has
exported its graphs (CAMSERVE_RUNTIME_BUILD=background, the default)."""

from __future__ import annotations

import asyncio
import sys
import time

import numpy as np
import pytest

from camserve.models import background
from tests.apphelpers import running_app

pytestmark = pytest.mark.anyio


async def _runtime(client) -> dict:
    return (await client.get("/models")).json()["models"][0]["runtime"]


async def _until_built(client, timeout_s: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (runtime := await _runtime(client))["building"]:
        assert time.monotonic() < deadline, f"still building after {timeout_s} s"
        await asyncio.sleep(0.5)
    return runtime


async def _probabilities(client, jpeg: bytes) -> np.ndarray:
    answer = await client.post("/predict", files=[("image", ("cat.jpg", jpeg, "image/jpeg"))], params={"top_k": 5})
    assert answer.status_code == 200, answer.text
    return np.array([p["score"] for p in answer.json()["results"][0]["predictions"]])


async def test_a_first_start_serves_eagerly_then_switches_to_onnx_runtime_and_a_restart_decides_before_ready(
    cat_jpeg, tmp_path
) -> None:
    settings = {"runtime": "auto", "runtime_build": "background", "cache_dir": tmp_path}
    async with running_app(None, **settings) as (client, app):
        assert app.state.lifecycle.is_ready
        first = await _runtime(client)
        served = app.state.service.registry.get()
        assert first["building"] and first["buckets"] == [] and served.engine.runtime is None  # eager for now
        eager = await _probabilities(client, cat_jpeg)
        built = await _until_built(client)
        assert built["layer"] == "_swish" and built["not_used"] == {} and built["build_s"] > 0
        assert [b["batch_sizes"] for b in built["buckets"]] == [[1, 1], [2, 8], [9, 16]]
        assert "onnxruntime" in {b["backend"] for b in built["buckets"]}  # 2-5x faster than eager here
        assert served.engine.runtime is not None and served.rerun_fraction < 0.1  # re-measured on the new runtime
        np.testing.assert_allclose(await _probabilities(client, cat_jpeg), eager, atol=1e-4)
    assert len(list(tmp_path.glob("runtime/*/prefix.onnx"))) == 1
    async with running_app(None, **settings) as (client, app):  # the cache is filled: chosen before readiness
        again = await _runtime(client)
        assert not again["building"] and again["from_cache"] and again["buckets"] == built["buckets"]


async def test_a_failed_background_export_leaves_the_model_eager_saying_why(
    cat_jpeg, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash = "import sys; sys.exit('camserve: model efficientnet-lite0: SplitError: no export today')"
    monkeypatch.setattr(background, "EXPORT_COMMAND", [sys.executable, "-c", crash])
    async with running_app(None, runtime="auto", runtime_build="background", cache_dir=tmp_path) as (client, app):
        runtime = await _until_built(client)
        assert runtime["buckets"] == [] and app.state.service.registry.get().engine.runtime is None
        reason = runtime["not_used"]["onnxruntime"]
        assert reason.startswith("the export process exited with 1: ") and "no export today" in reason
        assert (await _probabilities(client, cat_jpeg)).shape == (5,)


async def test_a_child_that_exports_nothing_for_this_model_never_makes_the_server_export(
    cat_jpeg, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that succeeds without writing this model's graph (its weights differed, say): the model stays eager
    saying so, instead of exporting on the torch thread between batches."""
    from camserve.models import runtimes

    monkeypatch.setattr(background, "EXPORT_COMMAND", [sys.executable, "-c", "pass"])
    exported = []
    monkeypatch.setattr(runtimes, "export_onnx", lambda *args: exported.append(args))
    async with running_app(None, runtime="auto", runtime_build="background", cache_dir=tmp_path) as (client, app):
        runtime = await _until_built(client)
        assert runtime["buckets"] == [] and "wrote no graph for this model" in runtime["not_used"]["onnxruntime"]
        assert (await _probabilities(client, cat_jpeg)).shape == (5,)
        assert app.state.service.registry.get().engine.runtime is None
    assert exported == [] and not list(tmp_path.glob("runtime/*/split.pt"))


def test_export_only_refuses_unknown_models_and_model_without_it(capsys, monkeypatch) -> None:
    from camserve.cli import main

    assert main(["prepare", "--export-only", "--model", "nope"]) == 2
    assert "unknown model(s) nope" in capsys.readouterr().err
    assert main(["prepare", "--model", "efficientnet-lite0"]) == 2
    assert "--model goes with --export-only" in capsys.readouterr().err


def test_only_an_export_the_cache_lacks_and_can_take_is_deferred(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deferred: `auto` or `onnxruntime` with the split or prefix missing from a writable cache. Not deferred: eager
    and compiled, a filled cache (the choice is read before readiness), a cache that cannot be written (the child
    could not hand its export over: it is built before readiness, as with `blocking`)."""
    import os

    from camserve.models.runtimes import deferrable, export_artifacts
    from tests.test_runtime import tiny_engine

    engine, example = tiny_engine()
    assert deferrable(engine, example, mode="auto", cache_dir=tmp_path)
    assert deferrable(engine, example, mode="onnxruntime", cache_dir=tmp_path)
    assert not deferrable(engine, example, mode="eager", cache_dir=tmp_path)
    assert not deferrable(engine, example, mode="compiled", cache_dir=tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(os, "access", lambda *_: False)
        assert not deferrable(engine, example, mode="auto", cache_dir=tmp_path)
    export_artifacts("m", engine, example, cache_dir=tmp_path)
    assert not deferrable(engine, example, mode="auto", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("runtime/*/split.pt"))) == len(list(tmp_path.glob("runtime/*/prefix.onnx"))) == 1
