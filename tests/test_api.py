"""The HTTP service through the real app (httpx against the ASGI app, lifespan included)."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import re
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from camserve.api import create_app
from camserve.batches import ModelBatches
from camserve.batching import BatchQueue
from camserve.cam.render import heatmaps, to_uint8
from camserve.images import decode_image, preprocess
from camserve.settings import Settings
from tests.apphelpers import metric, running_app
from tests.conftest import jpeg_bytes

pytestmark = pytest.mark.anyio
EGYPTIAN_CAT = 285


def png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


# -- health, models ---------------------------------------------------------------------------
async def test_health_and_models(registry):
    async with running_app(registry) as (client, _app):
        assert (await client.get("/health/live")).json() == {"status": "ok"}
        assert (await client.get("/health/ready")).status_code == 200
        body = (await client.get("/models")).json()
    (model,) = body["models"]
    assert model["name"] == "efficientnet-lite0" and model["default"] is True
    assert model["input_size"] == [224, 224] and model["mean"] == [0.5, 0.5, 0.5]
    assert model["num_classes"] == 1000 and model["default_layer"] == "_swish"
    assert model["device"] == "cpu"


async def test_layers_of_a_model_list_what_layer_accepts(registry, cat_jpeg):
    async with running_app(registry) as (client, _app):
        body = (await client.get("/models/efficientnet-lite0/layers")).json()
        unknown = await client.get("/models/nope/layers")
        layers = {layer["name"]: layer for layer in body["layers"]}
        spatial = [name for name, layer in layers.items() if layer["spatial"]]
        explained = await client.post(
            f"/explain?layer={spatial[0]}", content=cat_jpeg, headers={"content-type": "image/jpeg"}
        )
        flat = await client.post("/explain?layer=_fc", content=cat_jpeg, headers={"content-type": "image/jpeg"})
    assert body["model"] == "efficientnet-lite0" and body["default_layer"] == "_swish"
    assert layers["_swish"] == {
        "name": "_swish", "module": "ReLU6", "shape": [1280, 7, 7], "spatial": True, "layout": "nchw",
        "grid": [7, 7], "prefix_tokens": None,
    }  # fmt: skip
    assert layers["_conv_stem"]["shape"] == [32, 112, 112] and layers["_conv_stem"]["grid"] == [112, 112]
    assert layers["_fc"] == {
        "name": "_fc", "module": "Linear", "shape": [1000], "spatial": False, "layout": None, "grid": None,
        "prefix_tokens": None,
    }  # fmt: skip
    assert list(layers)[-1] == "_fc" and len(spatial) > 50
    assert explained.status_code == 200 and explained.json()["layers"] == [spatial[0]]
    assert flat.status_code == 422 and "'_fc' outputs [1000] per image" in flat.json()["detail"]
    assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]


async def test_ready_is_503_until_models_are_loaded(registry):
    release = threading.Event()

    def slow_load(_settings):
        release.wait(10)
        return registry

    app = create_app(Settings(), load_registry=slow_load)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client,
    ):
        assert (await client.get("/health/live")).status_code == 200
        not_ready = await client.get("/health/ready")
        assert not_ready.status_code == 503 and "loading" in not_ready.json()["detail"]
        refused = await client.post("/predict", content=b"x", headers={"content-type": "image/jpeg"})
        assert refused.status_code == 503 and "starting" in refused.json()["detail"]
        release.set()
        await app.state.loaded.wait()
        assert (await client.get("/health/ready")).status_code == 200


# -- predict ----------------------------------------------------------------------------------
async def test_predict_in_all_three_input_forms(registry, cat_jpeg, coffee_jpeg, labels):
    async with running_app(registry) as (client, _app):
        raw = await client.post("/predict?top_k=3", content=cat_jpeg, headers={"content-type": "image/jpeg"})
        multi = await client.post(
            "/predict",
            files=[("image", ("a.jpg", cat_jpeg, "image/jpeg")), ("image", ("b.jpg", coffee_jpeg, "image/jpeg"))],
        )
        as_json = await client.post(
            "/predict",
            json={"images": [base64.b64encode(coffee_jpeg).decode(), base64.b64encode(cat_jpeg).decode()], "top_k": 2},
        )
    assert raw.status_code == multi.status_code == as_json.status_code == 200, (raw.text, multi.text, as_json.text)
    first = raw.json()["results"][0]
    assert (first["width"], first["height"]) == (451, 300)
    assert len(first["predictions"]) == 3
    assert first["predictions"][0]["label"] == "Egyptian cat" and first["predictions"][0]["score"] > 0.6
    scores = [p["score"] for p in first["predictions"]]
    assert scores == sorted(scores, reverse=True)
    cat, cup = multi.json()["results"]
    assert cat["predictions"][0]["index"] == EGYPTIAN_CAT
    assert cup["predictions"][0]["label"] in {"espresso", "cup", "coffee mug"}
    assert (cup["width"], cup["height"]) == (600, 400)
    json_results = as_json.json()["results"]
    assert [r["predictions"][0]["index"] for r in json_results] == [
        cup["predictions"][0]["index"],
        EGYPTIAN_CAT,
    ]
    assert len(json_results[0]["predictions"]) == 2
    assert abs(json_results[1]["predictions"][0]["score"] - first["predictions"][0]["score"]) < 1e-5


# -- explain ----------------------------------------------------------------------------------
async def test_explain_returns_heatmaps_overlays_and_raw_maps_from_the_engine(registry, cat_jpeg):
    async with running_app(registry) as (client, _app):
        response = await client.post(
            "/explain",
            params=[
                ("method", "gradcam"),
                ("target", "Egyptian cat"),
                ("target", "281"),
                ("overlay", "true"),
                ("raw", "true"),
                ("colormap", "viridis"),
            ],
            files=[("image", ("cat.jpg", cat_jpeg, "image/jpeg"))],
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == "gradcam" and body["layers"] == ["_swish"] and body["model"] == "efficientnet-lite0"
    (result,) = body["results"]
    assert result["predictions"][0]["index"] == EGYPTIAN_CAT
    cat_e, tabby_e = result["explanations"]
    assert (cat_e["index"], cat_e["label"], tabby_e["index"]) == (EGYPTIAN_CAT, "Egyptian cat", 281)
    assert abs(cat_e["score"] - result["predictions"][0]["score"]) < 1e-6
    heat = png(cat_e["heatmap"])
    assert heat.mode == "L" and heat.size == (451, 300)
    overlay = png(cat_e["overlay"])
    assert overlay.mode == "RGB" and overlay.size == (451, 300)
    # the service's maps are the engine's maps for the same image and class
    model = registry.get()
    pixels = decode_image(cat_jpeg).pixels
    x = preprocess([pixels], model.input_size, model.mean, model.std)
    direct = model.engine.explain(x, [[EGYPTIAN_CAT, 281]], method="gradcam")
    np.testing.assert_allclose(np.array(cat_e["cam"]), direct.maps[0].numpy(), rtol=1e-4, atol=1e-5)
    expected = to_uint8(heatmaps(direct.maps[:1], (300, 451)))[0].numpy()
    assert np.abs(np.asarray(heat).astype(int) - expected.astype(int)).max() <= 1
    assert not np.array_equal(np.asarray(heat), np.asarray(png(tabby_e["heatmap"])))


async def test_explain_defaults_json_form_fusion_and_counterfactual(registry, cat_jpeg):
    b64 = base64.b64encode(cat_jpeg).decode()
    async with running_app(registry) as (client, _app):
        default = (await client.post("/explain", content=cat_jpeg, headers={"content-type": "image/jpeg"})).json()
        fused = await client.post(
            "/explain", json={"images": [b64], "layer": ["_blocks.10", "_swish"], "method": "gradcam++", "raw": True}
        )
        counter = (
            await client.post(
                "/explain?counterfactual=true&raw=true", content=cat_jpeg, headers={"content-type": "image/jpeg"}
            )
        ).json()
        plain = (
            await client.post("/explain?raw=true", content=cat_jpeg, headers={"content-type": "image/jpeg"})
        ).json()
    assert default["method"] == "gradcampp" and default["counterfactual"] is False
    explanation = default["results"][0]["explanations"][0]
    assert explanation["index"] == EGYPTIAN_CAT and "overlay" not in explanation and "cam" not in explanation
    assert fused.status_code == 200, fused.text
    assert fused.json()["layers"] == ["_blocks.10", "_swish"]
    assert np.array(fused.json()["results"][0]["explanations"][0]["cam"]).shape == (14, 14)
    assert counter["counterfactual"] is True
    c = np.array(counter["results"][0]["explanations"][0]["cam"])
    p = np.array(plain["results"][0]["explanations"][0]["cam"])
    assert c.shape == p.shape == (7, 7) and not np.allclose(c, p)


@pytest.mark.parametrize(
    "method",
    [
        "gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "guided-gradcam", "ablationcam", "eigencam",
        "scorecam&layer=_blocks.0",  # 16 channels: 16 masked forwards
        "rise&rise_masks=64", "reciprocam",
    ],
)  # fmt: skip
async def test_every_method_is_served(registry, cat_jpeg, method):
    async with running_app(registry) as (client, _app):
        response = await client.post(
            f"/explain?method={method}", content=cat_jpeg, headers={"content-type": "image/jpeg"}
        )
    assert response.status_code == 200, response.text
    assert response.json()["method"] == method.split("&")[0]
    heat = np.asarray(png(response.json()["results"][0]["explanations"][0]["heatmap"]))
    assert heat.shape == (300, 451) and heat.max() == 255 and heat.min() == 0


async def test_gradient_free_methods_through_http_equal_the_engine(registry, cat_jpeg):
    """The raw maps /explain returns are the engine's, for each target; Eigen-CAM's are the same for every target."""
    served = registry.get()
    x = preprocess([decode_image(cat_jpeg).pixels], served.input_size, served.mean, served.std, device=served.device)
    async with running_app(registry) as (client, _app):
        answers = {
            method: (
                await client.post(
                    f"/explain?method={method}&target=285&target=281&raw=true",
                    content=cat_jpeg,
                    headers={"content-type": "image/jpeg"},
                )
            ).json()
            for method in ("ablationcam", "eigencam")
        }
    for method, body in answers.items():
        expected = served.engine.explain(x, [[285, 281]], method=method).maps.numpy()
        cams = np.array([e["cam"] for e in body["results"][0]["explanations"]])
        np.testing.assert_allclose(cams, expected, rtol=1e-4, atol=1e-6)
    eigen = answers["eigencam"]["results"][0]["explanations"]
    assert eigen[0]["cam"] == eigen[1]["cam"]
    ablation = answers["ablationcam"]["results"][0]["explanations"]
    assert ablation[0]["cam"] != ablation[1]["cam"]


async def test_masked_forward_limit_and_bad_combinations(registry, cat_jpeg):
    jpeg = {"content-type": "image/jpeg"}
    text = base64.b64encode(cat_jpeg).decode()
    async with running_app(registry, max_masked_forwards=1500) as (client, _app):
        two = [("image", ("a.jpg", cat_jpeg, "image/jpeg")), ("image", ("b.jpg", cat_jpeg, "image/jpeg"))]
        over = await client.post("/explain?method=scorecam", files=two)
        fused = await client.post(
            "/explain?method=ablationcam&layer=_blocks.15&layer=_swish", content=cat_jpeg, headers=jpeg
        )
        within = await client.post("/explain?method=ablationcam", content=cat_jpeg, headers=jpeg)
        eigen_many = await client.post("/explain?method=eigencam", files=two)
        counter = await client.post("/explain?method=eigencam&counterfactual=true", content=cat_jpeg, headers=jpeg)
        v2 = await client.post(
            "/v2/models/efficientnet-lite0/infer",
            json={
                "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [text]}],
                "parameters": {"method": "scorecam", "counterfactual": True},
            },
        )
        v1 = await client.post(
            "/v1/models/efficientnet-lite0:explain",
            json={"instances": [{"image": {"b64": text}}] * 2, "method": "ablationcam"},
        )
    assert over.status_code == 413
    assert over.json()["detail"] == (
        "scorecam would run 2560 extra forward passes (2 image(s) x 1280 channels of layer(s) _swish (1280 channels)); "
        "the limit per request is 1500 (CAMSERVE_MAX_MASKED_FORWARDS): send fewer images, choose a layer with fewer "
        "channels, or use a gradient method"
    )
    assert fused.status_code == 413 and "1 image(s) x 1600 channels" in fused.json()["detail"]
    assert "_blocks.15 (320 channels), _swish (1280 channels)" in fused.json()["detail"]
    assert within.status_code == 200, within.text
    assert eigen_many.status_code == 200, eigen_many.text  # no extra forwards: no limit
    assert counter.status_code == 422
    assert "eigencam uses none (activation method)" in counter.json()["detail"]
    assert v2.status_code == 422 and "scorecam uses none (perturbation method)" in v2.json()["error"]
    assert v1.status_code == 413 and "2560 extra forward passes" in v1.json()["error"]


# -- errors -----------------------------------------------------------------------------------
async def test_error_statuses_name_their_cause(registry, cat_jpeg):
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.new("RGB", (300, 200), (10, 20, 30)).save(buffer, format="JPEG")
    small_jpeg = buffer.getvalue()  # 60,000 px: 2 targets x (heatmap + overlay) = 480,000 rendered px
    settings = {"max_image_pixels": 100_000, "max_body_bytes": 2_000_000, "max_render_pixels": 400_000}
    async with running_app(registry, **settings) as (client, _app):
        jpeg = {"content-type": "image/jpeg"}
        cases = [
            (await client.post("/predict", content=b"\x00garbage" * 50, headers=jpeg), 400, "not a recognized image"),
            (await client.post("/predict", json={"images": ["%%%not-base64"]}), 400, "images[0] is not valid base64"),
            (await client.post("/predict?model=nope", content=cat_jpeg, headers=jpeg), 404, "unknown model 'nope'"),
            (await client.post("/predict", content=cat_jpeg, headers=jpeg), 413, "megapixels"),
            (await client.post("/predict", content=b"x" * 2_000_001, headers=jpeg), 413, "exceeds"),
            (
                await client.post("/predict", content=b"hello", headers={"content-type": "text/plain"}),
                415,
                "text/plain",
            ),
            (await client.post("/predict", content=b"<svg/>", headers={"content-type": "image/svg+xml"}), 415, "svg"),
            (
                await client.post("/explain?method=smoothgradcam", content=cat_jpeg, headers=jpeg),
                422,
                "unknown CAM method",
            ),
            (await client.post("/explain?layer=_blocks.99", content=cat_jpeg, headers=jpeg), 422, "candidates"),
            (await client.post("/explain?target=1000", content=cat_jpeg, headers=jpeg), 422, "out of range"),
            (
                await client.post("/explain?target=unicorn", content=cat_jpeg, headers=jpeg),
                422,
                "unknown label 'unicorn'",
            ),
            (await client.post("/predict?top_k=0", content=cat_jpeg, headers=jpeg), 422, "top_k"),
            (await client.post("/explain?alpha=2", content=cat_jpeg, headers=jpeg), 422, "alpha"),
            (await client.post("/explain?colormap=rainbow", content=cat_jpeg, headers=jpeg), 422, "colormap"),
            (await client.post("/predict", files=[("other", ("a.jpg", cat_jpeg, "image/jpeg"))]), 400, "'image'"),
            (await client.post("/predict", files=[("image", ("a.jpg", b"", "image/jpeg"))]), 400, "empty"),
            (await client.post("/predict", json={"images": []}), 422, "images"),
            (
                await client.post(
                    "/explain?" + "&".join(f"target={i}" for i in range(21)), content=cat_jpeg, headers=jpeg
                ),
                422,
                "at most 20",
            ),
            (await client.post("/explain?layer=", content=cat_jpeg, headers=jpeg), 422, "unknown layer ''"),
            (
                await client.post("/explain?overlay=true&target=1&target=2", content=small_jpeg, headers=jpeg),
                413,
                "render 0.5 megapixels of heatmaps and overlays, above the limit of 0.4",
            ),
            (
                await client.post("/predict", content=b"{not json", headers={"content-type": "application/json"}),
                400,
                "JSON",
            ),
        ]
    for response, status, fragment in cases:
        assert response.status_code == status, (status, response.text)
        detail = response.json()["detail"]
        assert isinstance(detail, str) and re.search(re.escape(fragment), detail, re.IGNORECASE), (status, detail)


async def test_inputs_found_by_fuzzing_are_4xx_not_500(registry, cat_jpeg, monkeypatch):
    """Non-ASCII digits, deeply nested JSON, JSON booleans where numbers go, too many multipart files, and a
    render budget that the image headers already exceed (refused before anything is decoded)."""
    import camserve.inference as inference

    jpeg = {"content-type": "image/jpeg"}
    as_json = {"images": [base64.b64encode(cat_jpeg).decode()]}
    async with running_app(registry) as (client, _app):
        cases = [
            (await client.post("/explain?target=--5", content=cat_jpeg, headers=jpeg), 422, "unknown label '--5'"),
            (await client.post("/explain?target=%C2%B2", content=cat_jpeg, headers=jpeg), 422, "unknown label '²'"),
            (await client.post("/explain?size=%C2%B2", content=cat_jpeg, headers=jpeg), 422, "invalid size '²'"),
            (await client.post(f"/explain?size={'9' * 5000}", content=cat_jpeg, headers=jpeg), 422, "invalid size"),
            (await client.post(f"/explain?target={'9' * 5000}", content=cat_jpeg, headers=jpeg), 422, "unknown label"),
            (
                await client.post(
                    "/predict",
                    content=json.dumps(as_json)[:-1].encode() + b', "top_k": ' + b"9" * 5000 + b"}",
                    headers={"content-type": "application/json"},
                ),
                400,
                "the JSON body is malformed",
            ),
            (
                await client.post(
                    "/predict", content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"}
                ),
                400,
                "nested too deeply",
            ),
            (await client.post("/explain", json={**as_json, "target": True}), 422, "target"),
            (await client.post("/explain", json={**as_json, "size": True}), 422, "size"),
            (await client.post("/predict", json={**as_json, "top_k": True}), 422, "top_k"),
            (
                await client.post("/explain?targets=5", content=cat_jpeg, headers=jpeg),
                422,
                "unknown query parameter 'targets'; did you mean 'target'?",
            ),
            (
                await client.post("/predict?method=gradcam", content=cat_jpeg, headers=jpeg),
                422,
                "unknown query parameter 'method'; this route takes: model, priority, threshold, top_k",
            ),
            (
                await client.post("/predict", json={**as_json, "method": "gradcam", "target": 1, "overlay": None}),
                422,
                "method: Extra inputs are not permitted; target: Extra inputs are not permitted",
            ),
            (
                await client.post("/predict", files=[("image", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(40)]),
                413,
                "the limit is 32",
            ),
        ]
        for response, status, fragment in cases:
            assert response.status_code == status, (status, response.text)
            assert fragment in response.json()["detail"], response.text

    decoded: list[bytes] = []
    monkeypatch.setattr(inference, "decode_image", lambda data, limits: decoded.append(data))
    async with running_app(registry, max_render_pixels=100_000) as (client, _app):
        response = await client.post("/explain?overlay=true", content=cat_jpeg, headers=jpeg)
    assert response.status_code == 413 and "render" in response.json()["detail"]
    assert decoded == []  # refused from the header: nothing was decoded


async def test_api_key_protects_everything_but_health(registry, cat_jpeg):
    async with running_app(registry, api_key="s3cret") as (client, _app):
        jpeg = {"content-type": "image/jpeg"}
        assert (await client.get("/health/live")).status_code == 200
        assert (await client.get("/health/ready")).status_code == 200
        missing = await client.post("/predict", content=cat_jpeg, headers=jpeg)
        wrong = await client.post("/predict", content=cat_jpeg, headers={**jpeg, "authorization": "Bearer nope"})
        assert missing.status_code == wrong.status_code == 401
        assert "API key" in missing.json()["detail"]
        assert (await client.get("/models")).status_code == 401
        bearer = await client.post("/predict", content=cat_jpeg, headers={**jpeg, "authorization": "Bearer s3cret"})
        header = await client.get("/models", headers={"x-api-key": "s3cret"})
        assert bearer.status_code == 200 and header.status_code == 200


# -- the worker queue -------------------------------------------------------------------------
async def test_32_concurrent_explains_batch_and_match_one_by_one(registry, cat_jpeg, coffee_jpeg):
    photos = [cat_jpeg, coffee_jpeg]
    async with running_app(registry, max_batch_size=16) as (client, _app):

        async def explain(i: int):
            return await client.post(
                "/explain?raw=true&method=gradcampp", content=photos[i % 2], headers={"content-type": "image/jpeg"}
            )

        alone = [(await explain(i)).json() for i in range(2)]
        together = await asyncio.gather(*(explain(i) for i in range(32)))
        metrics_text = (await client.get("/metrics")).text
    assert all(r.status_code == 200 for r in together)
    for i, response in enumerate(together):
        got = response.json()["results"][0]["explanations"][0]
        want = alone[i % 2]["results"][0]["explanations"][0]
        assert got["index"] == want["index"]
        np.testing.assert_allclose(np.array(got["cam"]), np.array(want["cam"]), rtol=1e-4, atol=1e-5)
    items = metric(metrics_text, "camserve_inference_items_total", model="efficientnet-lite0")
    executions = metric(metrics_text, "camserve_inference_executions_total", model="efficientnet-lite0")
    assert items == 34 and executions < 34  # at least one batch held more than one image
    assert metric(metrics_text, "camserve_batch_size_bucket", model="efficientnet-lite0", le="1.0") < executions
    assert metric(metrics_text, "camserve_requests_total", endpoint="/explain", status="200") == 34


def slow_compute(seconds: float):
    original = ModelBatches.compute

    def compute(self, batch, *staged):
        time.sleep(seconds)
        return original(self, batch, *staged)

    return compute


async def test_flood_beyond_max_queue_gets_503_and_never_500(registry, cat_jpeg, monkeypatch):
    monkeypatch.setattr(ModelBatches, "compute", slow_compute(0.3))
    async with running_app(registry, max_queue=4, max_batch_size=2, max_images_per_request=4) as (client, _app):
        responses = await asyncio.gather(
            *(client.post("/predict", content=cat_jpeg, headers={"content-type": "image/jpeg"}) for _ in range(20))
        )
    statuses = [r.status_code for r in responses]
    assert 500 not in statuses
    assert statuses.count(200) >= 4 and statuses.count(503) >= 1
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and "overloaded" in refused.json()["detail"]


async def test_slow_batch_gives_504_and_health_stays_responsive(registry, cat_jpeg, monkeypatch):
    monkeypatch.setattr(ModelBatches, "compute", slow_compute(1.5))
    async with running_app(registry, request_timeout_s=0.5) as (client, _app):
        task = asyncio.create_task(client.post("/predict", content=cat_jpeg, headers={"content-type": "image/jpeg"}))
        await asyncio.sleep(0.1)
        started = time.perf_counter()
        live = await client.get("/health/live")
        health_latency = time.perf_counter() - started
        timed_out = await task
        waiting = asyncio.create_task(client.post("/predict", content=cat_jpeg, headers={"content-type": "image/jpeg"}))
        second = await waiting
    assert live.status_code == 200 and health_latency < 0.2
    assert timed_out.status_code == 504 and "did not finish within 0.5 s" in timed_out.json()["detail"]
    assert second.status_code == 504


async def test_timed_out_items_that_have_not_started_are_dropped(registry, cat_jpeg, monkeypatch, caplog):
    seen: list[int] = []
    original = ModelBatches.compute

    def counting(self, batch, *staged):
        seen.append(len(batch))
        time.sleep(0.6)
        return original(self, batch, *staged)

    monkeypatch.setattr(ModelBatches, "compute", counting)
    async with running_app(registry, request_timeout_s=0.3, max_batch_size=1) as (client, _app):
        responses = await asyncio.gather(
            *(client.post("/predict", content=cat_jpeg, headers={"content-type": "image/jpeg"}) for _ in range(4))
        )
        await asyncio.sleep(0.8)
    assert [r.status_code for r in responses] == [504] * 4
    assert len(seen) == 1  # the three that waited behind the first were dropped before compute
    gc.collect()  # abandoned futures must not be reported as "exception was never retrieved"
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_client_gone_while_sending_its_body_is_499_not_500(registry, cat_jpeg):
    """Raw ASGI: the body never arrives because the client disconnected; no 500, nothing computed."""
    async with running_app(registry) as (client, app):
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/explain",
            "raw_path": b"/explain",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"image/jpeg"), (b"content-length", str(len(cat_jpeg)).encode())],
            "client": ("127.0.0.1", 5555),
            "server": ("camserve", 80),
        }
        await app(scope, receive, send)
        metrics_text = (await client.get("/metrics")).text
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert metric(metrics_text, "camserve_requests_total", endpoint="/explain", status="499") == 1
    assert metric(metrics_text, "camserve_requests_total", endpoint="/explain", status="500") == 0
    assert metric(metrics_text, "camserve_inference_items_total") == 0


async def test_draining_turns_readiness_to_503_but_keeps_serving(registry, cat_jpeg):
    """Kubernetes still routes requests here until the endpoint removal has propagated: they are answered."""
    async with running_app(registry) as (client, app):
        app.state.lifecycle.drain()
        ready = await client.get("/health/ready")
        served = await client.post("/predict", content=cat_jpeg, headers={"content-type": "image/jpeg"})
        live = await client.get("/health/live")
        gauge = metric((await client.get("/metrics")).text, "camserve_ready")
    assert ready.status_code == 503 and ready.json() == {"detail": "shutting down"}
    assert served.status_code == 200 and served.json()["results"][0]["predictions"][0]["label"] == "Egyptian cat"
    assert live.status_code == 200 and gauge == 0


async def test_load_failure_is_reported_alike_by_readiness_and_routes():
    def broken(_settings):
        raise RuntimeError("weights file is truncated")

    app = create_app(Settings(), load_registry=broken)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client,
    ):
        await app.state.loaded.wait()
        ready = await client.get("/health/ready")
        refused = await client.post("/predict", content=b"x", headers={"content-type": "image/jpeg"})
    assert ready.status_code == 503 and ready.json() == {"detail": "model loading failed: weights file is truncated"}
    assert refused.status_code == 503 and "weights file is truncated" in refused.json()["detail"]


# -- OpenAPI ----------------------------------------------------------------------------------
def test_committed_openapi_matches_the_app():
    from pathlib import Path

    from camserve.openapi_export import openapi_text

    committed = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"
    assert committed.read_text(encoding="utf-8") == openapi_text(), "run `make openapi` and commit the result"
    document = json.loads(committed.read_text())
    for path in ("/predict", "/explain", "/models", "/health/live", "/health/ready", "/metrics"):
        for operation in document["paths"][path].values():
            assert operation.get("summary"), path
    explain_params = {p["name"]: p for p in document["paths"]["/explain"]["post"]["parameters"]}
    assert set(explain_params) >= {
        "model",
        "method",
        "target",
        "top_k",
        "layer",
        "counterfactual",
        "overlay",
        "colormap",
        "alpha",
        "raw",
    }
    assert all(p.get("description") for p in explain_params.values())
    for path in ("/predict", "/explain"):
        for parameter in document["paths"][path]["post"]["parameters"]:
            assert parameter["schema"].get("examples") or parameter.get("examples"), (path, parameter["name"])
    json_body = document["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert json_body["$ref"].rsplit("/", 1)[1] in document["components"]["schemas"]
    assert set(document["paths"]["/explain"]["post"]["requestBody"]["content"]) == {
        "multipart/form-data",
        "application/json",
        "image/*",
        "application/dicom",
    }


async def test_cors_is_off_by_default_and_configurable(registry):
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
    async with running_app(registry) as (client, _app):
        closed = await client.options("/predict", headers=preflight)
    async with running_app(registry, cors_origins=["https://app.example"]) as (client, _app):
        opened = await client.options("/predict", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    assert opened.status_code == 200 and opened.headers["access-control-allow-origin"] == "https://app.example"


async def test_max_wait_ms_holds_a_batch_open_for_stragglers(registry, cat_jpeg):
    async with running_app(registry, max_wait_ms=400, max_batch_size=4) as (client, _app):

        async def late(delay: float):
            await asyncio.sleep(delay)
            return await client.post("/predict", content=cat_jpeg, headers={"content-type": "image/jpeg"})

        responses = await asyncio.gather(late(0), late(0.05), late(0.1))
        text = (await client.get("/metrics")).text
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert metric(text, "camserve_inference_executions_total", model="efficientnet-lite0") == 1
    assert metric(text, "camserve_inference_items_total", model="efficientnet-lite0") == 3


async def test_all_torch_work_runs_on_the_one_torch_thread(registry, cat_jpeg, monkeypatch):
    """Model loading and every batch run on `camserve-torch` (a second torch thread slows CPU ops ~2.5x)."""
    threads: list[str] = []
    original = ModelBatches.compute

    def recording(self, batch, *staged):
        threads.append(threading.current_thread().name)
        return original(self, batch, *staged)

    monkeypatch.setattr(ModelBatches, "compute", recording)

    def load(_settings):
        threads.append(threading.current_thread().name)
        return registry

    app = create_app(Settings(), load_registry=load)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client,
    ):
        await app.state.loaded.wait()
        jpeg = {"content-type": "image/jpeg"}
        responses = [await client.post(path, content=cat_jpeg, headers=jpeg) for path in ("/predict", "/explain")]
    assert [r.status_code for r in responses] == [200, 200]
    assert len(threads) == 3 and all(name.startswith("camserve-torch") for name in threads), threads


async def test_random_parameters_and_bodies_never_give_a_500(registry, cat_jpeg):
    """Seeded fuzzing of query parameters, content types and bodies: every answer is 200 or a 4xx/503."""
    import random

    rng = random.Random(7)
    values = {
        "model": ["efficientnet-lite0", "", "x" * 300, "../etc", "☃"],
        "method": ["gradcam", "gradcam++", "GRADCAMPP", "guided-gradcam", "", "none", "layercam"],
        "target": ["0", "999", "-1", "1e3", "tabby", "", "Egyptian cat", "0x10", "nan"],
        "layer": ["_swish", "_blocks.0", "_fc", "_avg_pooling", "", "_blocks", ".", "_blocks.15._bn2"],
        "top_k": ["1", "0", "-5", "abc", "100000", "3.5"],
        "alpha": ["0", "1", "-0.1", "nan", "inf", "x"],
        "colormap": ["jet", "turbo", "", "JET"],
        "counterfactual": ["true", "false", "maybe", "1"],
        "overlay": ["true", "no", "2"],
        "raw": ["true", "0", "?"],
    }
    bodies = [
        (cat_jpeg, "image/jpeg"),
        (cat_jpeg[:500], "image/jpeg"),
        (b"", "image/png"),
        (b'{"images": ["AAAA"]}', "application/json"),
        (b'{"images": [1, 2]}', "application/json"),
        (b"[]", "application/json"),
        (b"\x00" * 100, "application/octet-stream"),
        (cat_jpeg, "multipart/form-data; boundary=nope"),
        (cat_jpeg, "image/gif"),
    ]
    async with running_app(registry) as (client, _app):
        for _ in range(120):
            chosen = rng.sample(sorted(values), rng.randint(0, 4))
            params = [(name, rng.choice(values[name])) for name in chosen]
            body, content_type = rng.choice(bodies)
            path = rng.choice(["/predict", "/explain"])
            response = await client.post(path, params=params, content=body, headers={"content-type": content_type})
            assert response.status_code == 200 or 400 <= response.status_code < 500 or response.status_code == 503, (
                path,
                params,
                content_type,
                response.status_code,
                response.text[:300],
            )
            if response.status_code != 200:
                assert isinstance(response.json()["detail"], str)


async def test_torch_threads_setting_applies_to_the_torch_thread(registry):
    before = torch.get_num_threads()
    try:
        async with running_app(None, torch_threads=1, warmup=False) as (client, app):
            assert (await client.get("/health/ready")).status_code in (200, 503)
            assert await app.state.torch_thread.run(torch.get_num_threads) == 1
    finally:
        torch.set_num_threads(before)


async def test_several_models_are_served_side_by_side(registry, cat_jpeg, tmp_path):
    from camserve.models import ModelRegistry, ModelSpec, load_model
    from tests.fixtures.tiny_models import tiny_classifier

    scripted = torch.jit.script(tiny_classifier().eval())
    scripted.save(str(tmp_path / "tiny.pt"))
    tiny = load_model(
        ModelSpec(name="tiny-ts", kind="torchscript", weights=tmp_path / "tiny.pt", input_size=(32, 32)),
        torch.device("cpu"),
    )
    both = ModelRegistry([registry.get(), tiny], default="efficientnet-lite0")
    jpeg = {"content-type": "image/jpeg"}
    async with running_app(both) as (client, _app):
        models = (await client.get("/models")).json()["models"]
        tiny_predict = await client.post("/predict?model=tiny-ts&top_k=10", content=cat_jpeg, headers=jpeg)
        default_predict = await client.post("/predict", content=cat_jpeg, headers=jpeg)
        tiny_explain = await client.post("/explain?model=tiny-ts", content=cat_jpeg, headers=jpeg)
        rise_url = "/explain?model=tiny-ts&method=rise&rise_masks=40"
        tiny_rise = await client.post(rise_url, content=cat_jpeg, headers=jpeg)
        tiny_layers = (await client.get("/models/tiny-ts/layers")).json()
    assert [(m["name"], m["default"], m["default_layer"]) for m in models] == [
        ("efficientnet-lite0", True, "_swish"),
        ("tiny-ts", False, None),
    ]
    assert tiny_predict.status_code == 200 and len(tiny_predict.json()["results"][0]["predictions"]) == 4
    assert default_predict.json()["results"][0]["predictions"][0]["label"] == "Egyptian cat"
    assert tiny_explain.status_code == 422 and "TorchScript" in tiny_explain.json()["detail"]
    assert "gradcampp" in tiny_explain.json()["detail"] and "explains with: rise" in tiny_explain.json()["detail"]
    assert tiny_rise.status_code == 200, tiny_rise.text
    rise = tiny_rise.json()
    assert rise["layers"] == [] and rise["method"] == "rise"
    top = rise["results"][0]["predictions"][0]["index"]
    assert [e["index"] for e in rise["results"][0]["explanations"]] == [top]
    assert tiny_layers == {"model": "tiny-ts", "default_layer": None, "layers": []}


async def test_large_images_are_resized_while_decoding_and_explain_the_same(registry, chelsea, monkeypatch):
    """Above the pixel threshold the decode thread resizes (PIL, float): the batch gets model-size float
    inputs, and maps and scores equal those of resizing in the batch (torch)."""
    import camserve.inference as inference

    big = np.asarray(Image.fromarray(chelsea).resize((1600, 1064), Image.Resampling.BICUBIC))
    submitted: list[torch.Tensor] = []
    original_submit = BatchQueue.submit

    def spy(self, items, **lane):
        submitted.extend(item.pixels for item in items)
        return original_submit(self, items, **lane)

    monkeypatch.setattr(BatchQueue, "submit", spy)
    bodies = {}
    async with running_app(registry) as (client, _app):
        for threshold in (inference.RESIZE_WHILE_DECODING_ABOVE, 10**9):
            monkeypatch.setattr(inference, "RESIZE_WHILE_DECODING_ABOVE", threshold)
            response = await client.post(
                "/explain?raw=true", content=jpeg_bytes(big), headers={"content-type": "image/jpeg"}
            )
            assert response.status_code == 200, response.text
            bodies[threshold] = response.json()["results"][0]
    while_decoding, in_batch = submitted
    assert while_decoding.dtype == torch.float32 and tuple(while_decoding.shape) == (3, 224, 224)
    assert in_batch.dtype == torch.uint8 and tuple(in_batch.shape) == (3, 1064, 1600)
    first, second = bodies.values()
    assert [p["index"] for p in first["predictions"]] == [p["index"] for p in second["predictions"]]
    np.testing.assert_allclose(
        [p["score"] for p in first["predictions"]], [p["score"] for p in second["predictions"]], atol=1e-4
    )
    np.testing.assert_allclose(
        np.array(first["explanations"][0]["cam"]), np.array(second["explanations"][0]["cam"]), rtol=1e-3, atol=1e-4
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_cuda_service_explains_gpu_decoded_and_large_cpu_decoded_images(registry, cat_jpeg, chelsea):
    """On CUDA: a JPEG decoded by nvJPEG (pixels on the GPU) and a large PNG resized while decoding
    (float input moved to the GPU) both explain, with overlays, like the CPU service."""
    from camserve.models import ModelRegistry

    big = np.asarray(Image.fromarray(chelsea).resize((1600, 1064), Image.Resampling.BICUBIC))
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, format="PNG")
    uploads = [(cat_jpeg, "image/jpeg", (451, 300)), (buffer.getvalue(), "image/png", (1600, 1064))]
    answers = {}
    for name, models in (("cpu", registry), ("cuda", ModelRegistry.load(None, "cuda"))):
        async with running_app(models) as (client, _app):
            for data, media_type, size in uploads:
                response = await client.post(
                    "/explain?overlay=true&raw=true", content=data, headers={"content-type": media_type}
                )
                assert response.status_code == 200, response.text
                explanation = response.json()["results"][0]["explanations"][0]
                assert png(explanation["overlay"]).size == size and png(explanation["heatmap"]).size == size
                answers[name, media_type] = explanation
    for _, media_type, _ in uploads:
        cpu, cuda = answers["cpu", media_type], answers["cuda", media_type]
        assert cpu["index"] == cuda["index"]
        # nvJPEG and libjpeg differ by a grey level here and there: compare the maps' shape, not exact values
        correlation = np.corrcoef(np.ravel(cuda["cam"]), np.ravel(cpu["cam"]))[0, 1]
        assert correlation > 0.98


async def test_full_pixels_are_kept_only_for_overlays(registry, chelsea):
    """A 1.7 MP photo: the model gets a 224 x 224 float input; the 5 MB of full pixels stay only when an
    overlay will be drawn from them."""
    from camserve.inference import ImagePayload

    big = np.asarray(Image.fromarray(chelsea).resize((1600, 1064), Image.Resampling.BICUBIC))
    payload = [ImagePayload(jpeg_bytes(big), "image/jpeg")]
    async with running_app(registry) as (_client, app):
        service, served = app.state.service, registry.get()
        dropped = (await service._decode(payload, served, keep_pixels=False))[0]
        kept = (await service._decode(payload, served, keep_pixels=True))[0]
    assert (dropped.width, dropped.height) == (kept.width, kept.height) == (1600, 1064)
    assert dropped.pixels is None and tuple(dropped.model_input.shape) == (3, 224, 224)
    assert kept.pixels is not None and tuple(kept.pixels.shape) == (3, 1064, 1600)
    assert torch.equal(kept.model_input, dropped.model_input)


# -- picture format and size ----------------------------------------------------------------------
async def test_overlay_formats_and_picture_sizes(registry, cat_jpeg):
    from camserve.cam.render import heatmap_image

    jpeg = {"content-type": "image/jpeg"}

    async def explain(**params: str) -> dict:
        response = await client.post(
            "/explain", params={"overlay": "true", "raw": "true", **params}, content=cat_jpeg, headers=jpeg
        )
        assert response.status_code == 200, response.text
        return response.json()["results"][0]

    async with running_app(registry) as (client, _app):
        default = await explain()
        as_jpeg = await explain(overlay_format="jpeg")
        as_webp = await explain(overlay_format="webp", size="model")
        capped = await explain(size="200")
        uncapped = await explain(size="1000")
        body = {"images": [base64.b64encode(cat_jpeg).decode()], "overlay": True, "overlay_format": "jpeg", "size": 90}
        from_json = (await client.post("/explain", json=body)).json()["results"][0]
    original = default["explanations"][0]
    assert original["overlay_media_type"] == "image/png" and "picture_width" not in default
    assert png(original["overlay"]).format == "PNG" and png(original["overlay"]).size == (451, 300)

    entry = as_jpeg["explanations"][0]
    assert entry["overlay_media_type"] == "image/jpeg"
    assert png(entry["overlay"]).format == "JPEG" and png(entry["overlay"]).size == (451, 300)
    assert png(entry["heatmap"]).format == "PNG" and png(entry["heatmap"]).size == (451, 300)
    assert entry["heatmap"] == original["heatmap"]  # heatmaps stay lossless PNG
    # lossy but close to the PNG overlay
    difference = np.abs(np.asarray(png(entry["overlay"]), np.int16) - np.asarray(png(original["overlay"]), np.int16))
    assert difference.mean() < 4

    entry = as_webp["explanations"][0]
    assert entry["overlay_media_type"] == "image/webp"
    assert png(entry["overlay"]).format == "WEBP" and png(entry["overlay"]).size == (224, 224)
    assert png(entry["heatmap"]).format == "PNG" and png(entry["heatmap"]).size == (224, 224)
    assert (as_webp["picture_width"], as_webp["picture_height"]) == (224, 224)
    assert (as_webp["width"], as_webp["height"]) == (451, 300)  # the image's own size is still reported

    # size=N caps the longer side at N, aspect ratio kept; the heatmap is the raw map resized straight to it
    entry = capped["explanations"][0]
    assert (capped["picture_width"], capped["picture_height"]) == (200, 133)
    assert png(entry["overlay"]).size == (200, 133) and png(entry["heatmap"]).size == (200, 133)
    expected = heatmap_image(np.asarray(entry["cam"], np.float32), (133, 200))
    assert np.array_equal(np.asarray(png(entry["heatmap"])), expected)
    # ... and within a grey level or so of the full-size heatmap resized
    full = png(original["heatmap"]).resize((200, 133), Image.Resampling.BILINEAR)
    assert np.abs(np.asarray(full, np.int16) - np.asarray(png(entry["heatmap"]), np.int16)).mean() < 1.0
    # never enlarged
    assert png(uncapped["explanations"][0]["overlay"]).size == (451, 300)
    assert (uncapped["picture_width"], uncapped["picture_height"]) == (451, 300)

    entry = from_json["explanations"][0]
    assert entry["overlay_media_type"] == "image/jpeg" and png(entry["overlay"]).size == (90, 60)


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"overlay_format": "gif"}, "overlay_format"),
        ({"overlay_format": "PNG"}, "overlay_format"),
        ({"size": "0"}, "size"),
        ({"size": "-5"}, "size"),
        ({"size": "8193"}, "size"),
        ({"size": "1.5"}, "size"),
        ({"size": "thumbnail"}, "size"),
    ],
)
async def test_bad_overlay_format_or_size_is_a_422_naming_it(registry, cat_jpeg, params, named):
    async with running_app(registry) as (client, _app):
        response = await client.post(
            "/explain", params={"overlay": "true", **params}, content=cat_jpeg, headers={"content-type": "image/jpeg"}
        )
    assert response.status_code == 422 and named in response.json()["detail"], response.text


async def test_a_requests_images_are_handled_in_a_few_threads_in_order_and_fail_as_in_sequence(monkeypatch):
    """`in_threads` keeps the order and runs `IMAGE_THREADS` threads at once; a failure is the first item's in order
    (item 5's, though item 9 fails first in time), and items after a failed one are not started."""
    from camserve import inference

    monkeypatch.setattr(inference, "IMAGE_THREADS", 3)
    together = threading.Barrier(3, timeout=10)  # all three runs start their first item at once, or this fails

    def work(item: int) -> int:
        if item in (0, 4, 8):  # the first item of each run of 4, 4 and 2
            together.wait()
        return item * item

    assert await inference.in_threads(work, list(range(10))) == [i * i for i in range(10)]
    assert await inference.in_threads(work, []) == []
    assert await inference.in_threads(lambda item: item + 1, [1, 2, 3], threads=1) == [2, 3, 4]

    def late_and_early(item: int) -> int:
        if item == 9:
            raise ValueError("item 9")
        if item == 5:
            time.sleep(0.3)
            raise ValueError("item 5")
        return item

    with pytest.raises(ValueError, match="item 5"):
        await inference.in_threads(late_and_early, list(range(10)))

    started: list[int] = []
    begun = threading.Barrier(3, timeout=10)

    def first_fails(item: int) -> int:
        started.append(item)
        if item in (0, 4, 8):
            begun.wait()  # every run has begun its first item
        if item == 1:
            raise ValueError("item 1")
        if item > 1:
            time.sleep(0.3)  # item 1 fails long before these end
        return item

    with pytest.raises(ValueError, match="item 1"):
        await inference.in_threads(first_fails, list(range(10)))
    assert sorted(started) == [0, 1, 4, 8]  # the other runs stop after the item they had begun


async def test_the_host_is_busy_while_a_request_decodes_or_renders_and_not_while_its_batch_computes(
    registry, cat_jpeg, monkeypatch
):
    """What `ModelBatches` reads to leave the cores to other requests' decoding and rendering (`host_busy`)."""
    from camserve import inference

    async with running_app(registry) as (client, app):
        service = app.state.service
        seen: dict[str, list[bool]] = {"decode": [], "batch": [], "render": []}
        real_decode, real_render = inference.decode_image, inference.image_result
        real_predict = service.registry.get().engine.predict

        def decode(*args, **kwargs):
            seen["decode"].append(service.host_busy())
            return real_decode(*args, **kwargs)

        def render(*args, **kwargs):
            seen["render"].append(service.host_busy())
            return real_render(*args, **kwargs)

        def predict(*args, **kwargs):
            seen["batch"].append(service.host_busy())
            return real_predict(*args, **kwargs)

        monkeypatch.setattr(inference, "decode_image", decode)
        monkeypatch.setattr(inference, "image_result", render)
        monkeypatch.setattr(service.registry.get().engine, "predict", predict)
        response = await client.post("/predict", content=cat_jpeg, headers={"content-type": "image/jpeg"})
        assert response.status_code == 200
        assert seen == {"decode": [True], "batch": [False], "render": [True]}
        assert service.in_host_stages == 0
        failed = await client.post("/predict", content=b"not a picture", headers={"content-type": "image/jpeg"})
        assert failed.status_code in (400, 415) and service.in_host_stages == 0  # a failing stage is left too
        assert seen["decode"] == [True, True]


async def test_large_photos_are_decoded_one_at_a_time_and_small_ones_side_by_side(registry, cat_jpeg, monkeypatch):
    from camserve import inference

    calls: list[int | None] = []
    real = inference.in_threads

    async def recording(function, items, threads=None):
        calls.append(threads)
        return await real(function, items, threads)

    monkeypatch.setattr(inference, "in_threads", recording)
    async with running_app(registry) as (client, _app):
        files = [("image", ("a.jpg", cat_jpeg, "image/jpeg")), ("image", ("b.jpg", cat_jpeg, "image/jpeg"))]
        assert (await client.post("/predict", files=files)).status_code == 200
        monkeypatch.setattr(inference, "PARALLEL_DECODE_MAX_PIXELS", 1000)  # the cat is larger than this
        assert (await client.post("/predict", files=files)).status_code == 200
    assert calls == [None, None, 1, None]  # decode, render; decode one at a time, render
