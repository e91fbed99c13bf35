"""The Open Inference Protocol v2 against a live server: the official Triton client and httpx, JSON and binary tensor
data, gzip, health and readiness through the lifecycle, and the same answers as /predict and /explain."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.protocolhelpers import (
    EGYPTIAN_CAT,
    MODEL,
    TABBY,
    b64,
    binary_request,
    explain_reference,
    images_input,
    pixels,
    tritonclient_http,
)


def probabilities_from_predict(live: str, photo: bytes) -> np.ndarray:
    """The full probability vector through /predict (top_k = every class)."""
    response = httpx.post(
        f"{live}/predict?top_k=1000", content=photo, headers={"content-type": "image/jpeg"}, timeout=60
    )
    assert response.status_code == 200, response.text
    vector = np.zeros(1000, dtype=np.float32)
    for p in response.json()["results"][0]["predictions"]:
        vector[p["index"]] = p["score"]
    return vector


def test_triton_client_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL) and triton.is_model_ready(MODEL, "1")
    assert not triton.is_model_ready("nope")
    server = triton.get_server_metadata()
    assert server["name"] == "camserve" and "binary_tensor_data" in server["extensions"]
    metadata = triton.get_model_metadata(MODEL)
    assert triton.get_model_metadata(MODEL, "1") == metadata
    assert metadata["name"] == MODEL and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]}
    assert outputs == {
        "probabilities": ("FP32", [-1, 1000]),
        "explained_class": ("INT64", [-1, -1]),
        "cam": ("FP32", [-1, -1, -1, -1]),
        "heatmap": ("BYTES", [-1, -1]),
        "overlay": ("BYTES", [-1, -1]),
        "faithfulness": ("FP32", [-1, -1, 4]),
    }


def test_triton_infer_binary_and_json_give_predicts_probabilities(live, triton, cat_jpeg, coffee_jpeg):
    expected_cat = probabilities_from_predict(live, cat_jpeg)
    expected_coffee = probabilities_from_predict(live, coffee_jpeg)

    binary = triton.infer(MODEL, [images_input([cat_jpeg, coffee_jpeg], binary=True)])  # every output binary
    response = binary.get_response()
    assert [o["name"] for o in response["outputs"]] == ["probabilities"]
    assert "binary_data_size" in response["outputs"][0]["parameters"]
    probabilities = binary.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (2, 1000)
    np.testing.assert_allclose(probabilities[0], expected_cat, atol=1e-5)
    np.testing.assert_allclose(probabilities[1], expected_coffee, atol=1e-5)
    assert probabilities[0].argmax() == EGYPTIAN_CAT

    requested = [tritonclient_http.InferRequestedOutput("probabilities", binary_data=False)]
    as_json = triton.infer(MODEL, [images_input([cat_jpeg], binary=False)], outputs=requested, request_id="7")
    assert as_json.get_response()["id"] == "7" and "data" in as_json.get_response()["outputs"][0]
    np.testing.assert_allclose(as_json.as_numpy("probabilities")[0], expected_cat, atol=1e-5)
    versioned = triton.infer(MODEL, [images_input([cat_jpeg], binary=True)], model_version="1")
    np.testing.assert_allclose(versioned.as_numpy("probabilities")[0], expected_cat, atol=1e-5)


def test_triton_explanation_equals_explain(live, triton, cat_jpeg):
    reference = explain_reference(live, cat_jpeg)
    parameters = {"method": "gradcam", "target": f"{EGYPTIAN_CAT},tabby"}
    result = triton.infer(MODEL, [images_input([cat_jpeg], binary=True)], parameters=parameters)
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["probabilities", "explained_class", "cam", "heatmap"]
    assert result.as_numpy("explained_class").tolist() == [[EGYPTIAN_CAT, TABBY]]
    cams = result.as_numpy("cam")
    assert cams.dtype == np.float32 and cams.shape == (1, 2, 7, 7)
    heatmaps = result.as_numpy("heatmap")
    assert heatmaps.shape == (1, 2)
    for t, explanation in enumerate(reference["explanations"]):
        np.testing.assert_allclose(cams[0, t], np.array(explanation["cam"]), rtol=1e-5, atol=1e-6)
        expected = pixels(base64.b64decode(explanation["heatmap"]))
        assert np.array_equal(pixels(heatmaps[0, t]), expected)  # PNG bytes of the same 8-bit image
        assert expected.shape == (300, 451)

    # JSON outputs, the outputs list honoured, an overlay asked for by name
    outputs = [
        tritonclient_http.InferRequestedOutput("heatmap", binary_data=False),
        tritonclient_http.InferRequestedOutput("overlay", binary_data=True),
    ]
    chosen = triton.infer(MODEL, [images_input([cat_jpeg], binary=False)], outputs=outputs, parameters=parameters)
    assert [o["name"] for o in chosen.get_response()["outputs"]] == ["heatmap", "overlay"]
    heatmap_text = chosen.as_numpy("heatmap")[0, 0]
    text = heatmap_text.decode() if isinstance(heatmap_text, bytes) else heatmap_text
    assert np.array_equal(pixels(base64.b64decode(text)), pixels(heatmaps[0, 0]))
    overlay = Image.open(io.BytesIO(chosen.as_numpy("overlay")[0, 1]))
    assert overlay.mode == "RGB" and overlay.size == (451, 300)


def test_v2_json_requests_with_httpx(live, cat_jpeg):
    body = {"inputs": [{"name": "images", "shape": [1, 1], "datatype": "BYTES", "data": [[b64(cat_jpeg)]]}]}
    response = httpx.post(f"{live}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    (output,) = response.json()["outputs"]
    assert output["shape"] == [1, 1000] and output["datatype"] == "FP32" and len(output["data"]) == 1000
    assert int(np.argmax(output["data"])) == EGYPTIAN_CAT
    assert httpx.get(f"{live}/v2/health/live").status_code == 200
    assert httpx.get(f"{live}/v2/health/ready").status_code == 200
    assert httpx.get(f"{live}/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}


def test_triton_client_reports_the_protocol_error(triton, cat_jpeg):
    with pytest.raises(tritonclient_http.InferenceServerException) as raised:
        triton.infer("nope", [images_input([cat_jpeg], binary=True)])
    assert raised.value.status() == "404" and "unknown model 'nope'" in raised.value.message()


def test_binary_request_by_hand_and_gzip(live, cat_jpeg, coffee_jpeg):
    import gzip

    body, headers = binary_request(
        [cat_jpeg, coffee_jpeg], outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}]
    )
    for content, extra in ((body, {}), (gzip.compress(body), {"content-encoding": "gzip"})):
        response = httpx.post(
            f"{live}/v2/models/{MODEL}/infer", content=content, headers={**headers, **extra}, timeout=60
        )
        assert response.status_code == 200, response.text
        length = int(response.headers["Inference-Header-Content-Length"])
        header = json.loads(response.content[:length])
        (output,) = header["outputs"]
        assert output["shape"] == [2, 1000] and output["parameters"]["binary_data_size"] == 8000
        probabilities = np.frombuffer(response.content[length:], dtype="<f4").reshape(2, 1000)
        assert probabilities[0].argmax() == EGYPTIAN_CAT
    two_members = gzip.compress(body[:100]) + gzip.compress(body[100:])  # as `cat a.gz b.gz` makes
    response = httpx.post(
        f"{live}/v2/models/{MODEL}/infer", content=two_members, headers={**headers, "content-encoding": "gzip"}
    )
    assert response.status_code == 200, response.text
    compressed = gzip.compress(body)
    for broken, problem in ((compressed[:-4], "is cut off"), (compressed + b"junk", "has bytes after its end")):
        response = httpx.post(
            f"{live}/v2/models/{MODEL}/infer", content=broken, headers={**headers, "content-encoding": "gzip"}
        )
        assert response.status_code == 400 and f"the gzip request body {problem}" in response.json()["error"]


def test_v2_goes_through_the_batching_queue(registry, cat_jpeg, monkeypatch):
    """One v2 request with two images and a /predict: the worker batches them like any other items."""
    import asyncio

    from camserve.batches import ModelBatches
    from tests.apphelpers import running_app

    sizes: list[int] = []
    original = ModelBatches.compute

    def counting(self, batch, *staged):
        sizes.append(len(batch))
        time.sleep(0.3)
        return original(self, batch, *staged)

    monkeypatch.setattr(ModelBatches, "compute", counting)
    body = {"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES", "data": [b64(cat_jpeg), b64(cat_jpeg)]}]}

    async def scenario():
        async with running_app(registry) as (client, _app):
            first = asyncio.create_task(
                client.post("/predict", content=cat_jpeg, headers={"content-type": "image/jpeg"})
            )
            await asyncio.sleep(0.1)  # the first batch is computing; the next two requests queue behind it
            v2, v1 = await asyncio.gather(
                client.post(f"/v2/models/{MODEL}/infer", json=body),
                client.post(f"/v1/models/{MODEL}:predict", json={"instances": [{"image": {"b64": b64(cat_jpeg)}}]}),
            )
            return (await first).status_code, v2.status_code, v1.status_code

    assert asyncio.run(scenario()) == (200, 200, 200)
    assert sizes == [1, 3]


def test_v2_readiness_follows_the_lifecycle_loading_ready_draining(registry):
    import asyncio

    from camserve.api import create_app
    from camserve.settings import Settings

    release = threading.Event()

    def slow_load(_settings):
        release.wait(10)
        return registry

    async def scenario():
        app = create_app(Settings(), load_registry=slow_load)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client,
        ):
            loading = [
                await client.get(p) for p in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready")
            ]
            v1_loading = await client.get(f"/v1/models/{MODEL}")
            release.set()
            await app.state.loaded.wait()
            ready = [(await client.get(p)).status_code for p in ("/v2/health/ready", f"/v2/models/{MODEL}/ready")]
            app.state.lifecycle.drain()
            draining = [await client.get(p) for p in ("/v2/health/ready", f"/v2/models/{MODEL}/ready")]
            v1_draining = (await client.get(f"/v1/models/{MODEL}")).json()
            return loading, v1_loading, ready, draining, v1_draining

    loading, v1_loading, ready, draining, v1_draining = asyncio.run(scenario())
    assert [r.status_code for r in loading] == [200, 503, 503]
    assert "loading" in loading[1].json()["error"] and "starting" in loading[2].json()["error"]
    assert v1_loading.status_code == 503 and set(v1_loading.json()) == {"error"}
    assert ready == [200, 200]
    assert [r.status_code for r in draining] == [503, 503]
    assert all("shutting down" in r.json()["error"] for r in draining)
    assert v1_draining == {"name": MODEL, "ready": False}


def test_v2_health_answers_the_json_bodies_kserve_sends(live):
    for path, body in (("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True})):
        response = httpx.get(f"{live}{path}")
        assert (response.status_code, response.headers["content-type"], response.json()) == (
            200,
            "application/json",
            body,
        )


def test_own_and_v2_health_read_one_lifecycle_in_every_phase(registry):
    """/health and /v2/health (and v2 model readiness) give the same verdict: loading, ready, draining, broken;
    the v2 answers are {"live"/"ready": true} or 503 {"error"} with Retry-After."""
    import asyncio

    from camserve.api import create_app
    from camserve.settings import Settings

    release = threading.Event()

    def slow_load(_settings):
        release.wait(10)
        return registry

    paths = ("/health/live", "/v2/health/live", "/health/ready", "/v2/health/ready", f"/v2/models/{MODEL}/ready")

    async def scenario():
        app = create_app(Settings(), load_registry=slow_load)
        phases = {}
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client,
        ):
            phases["loading"] = [await client.get(p) for p in paths]
            release.set()
            await app.state.loaded.wait()
            phases["ready"] = [await client.get(p) for p in paths]
            app.state.lifecycle.drain()
            phases["draining"] = [await client.get(p) for p in paths]
            app.state.lifecycle.broken(RuntimeError("sticky CUDA error"))
            phases["broken"] = [await client.get(p) for p in paths]
            phases["root"] = [await client.get("/", headers={"accept": "application/json"})]
        return phases

    phases = asyncio.run(scenario())
    statuses = {phase: [r.status_code for r in answers] for phase, answers in phases.items()}
    assert statuses == {
        "loading": [200, 200, 503, 503, 503],
        "ready": [200, 200, 200, 200, 200],
        "draining": [200, 200, 503, 503, 503],
        "broken": [503, 503, 503, 503, 503],
        "root": [503],
    }
    assert [r.json() for r in phases["ready"][1:4:2]] == [{"live": True}, {"ready": True}]
    restart = "the device failed and this instance needs a restart: sticky CUDA error"
    broken_live = phases["broken"][1]
    assert broken_live.json() == {"error": f"not live: {restart}"} and broken_live.headers["retry-after"] == "5"
    assert phases["draining"][3].json() == {"error": "not ready: shutting down"}
    assert phases["root"][0].json() == {"detail": restart}


def test_a_raw_image_as_octet_stream_is_one_image_on_v2_infer(live, cat_jpeg):
    expected = probabilities_from_predict(live, cat_jpeg)
    for path in (f"/v2/models/{MODEL}/infer", f"/v2/models/{MODEL}/versions/1/infer"):
        response = httpx.post(
            f"{live}{path}", content=cat_jpeg, headers={"content-type": "application/octet-stream"}, timeout=60
        )
        assert response.status_code == 200 and response.headers["content-type"] == "application/json", response.text
        (output,) = response.json()["outputs"]
        assert (output["name"], output["shape"]) == ("probabilities", [1, 1000])
        np.testing.assert_allclose(output["data"], expected, atol=1e-5)
