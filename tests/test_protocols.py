"""KServe v1 and the Open Inference Protocol v2 against a live server: the official Triton client, httpx, and the
same answers as /predict and /explain; errors in the protocols' form; the OpenAPI examples a fuzzer sends."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.apphelpers import live_server
from tests.conftest import jpeg_bytes

try:
    import tritonclient.http as tritonclient_http
except ImportError:  # the test extras bring it; without them only the tritonclient tests skip
    tritonclient_http = None

MODEL = "efficientnet-lite0"
EGYPTIAN_CAT, TABBY = 285, 281


@pytest.fixture(scope="module")
def live(registry):
    """A real uvicorn serving the app (the session's model) on a free port, in a thread; yields its base URL."""
    with live_server(registry, max_images_per_request=4) as url:
        yield url


@pytest.fixture(scope="module")
def cat(chelsea) -> bytes:
    return jpeg_bytes(chelsea)


@pytest.fixture(scope="module")
def coffee_photo(coffee) -> bytes:
    return jpeg_bytes(coffee)


@pytest.fixture(scope="module")
def triton(live):
    if tritonclient_http is None:
        pytest.skip("tritonclient is not installed: pip install 'tritonclient[http]'")
    return tritonclient_http.InferenceServerClient(url=live.removeprefix("http://"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


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


def explain_reference(live: str, photo: bytes) -> dict:
    """/explain's answer for Grad-CAM of two classes, raw maps included."""
    response = httpx.post(
        f"{live}/explain",
        params=[("method", "gradcam"), ("target", str(EGYPTIAN_CAT)), ("target", "tabby"), ("raw", "true")],
        content=photo,
        headers={"content-type": "image/jpeg"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def images_input(photos: list[bytes], binary: bool):
    tensor = tritonclient_http.InferInput("images", [len(photos)], "BYTES")
    values = photos if binary else [b64(p) for p in photos]
    tensor.set_data_from_numpy(np.array(values, dtype=object), binary_data=binary)
    return tensor


# -- Open Inference Protocol v2 with tritonclient ---------------------------------------------
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


def test_triton_infer_binary_and_json_give_predicts_probabilities(live, triton, cat, coffee_photo):
    expected_cat = probabilities_from_predict(live, cat)
    expected_coffee = probabilities_from_predict(live, coffee_photo)

    binary = triton.infer(MODEL, [images_input([cat, coffee_photo], binary=True)])  # every output binary
    response = binary.get_response()
    assert [o["name"] for o in response["outputs"]] == ["probabilities"]
    assert "binary_data_size" in response["outputs"][0]["parameters"]
    probabilities = binary.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (2, 1000)
    np.testing.assert_allclose(probabilities[0], expected_cat, atol=1e-5)
    np.testing.assert_allclose(probabilities[1], expected_coffee, atol=1e-5)
    assert probabilities[0].argmax() == EGYPTIAN_CAT

    requested = [tritonclient_http.InferRequestedOutput("probabilities", binary_data=False)]
    as_json = triton.infer(MODEL, [images_input([cat], binary=False)], outputs=requested, request_id="7")
    assert as_json.get_response()["id"] == "7" and "data" in as_json.get_response()["outputs"][0]
    np.testing.assert_allclose(as_json.as_numpy("probabilities")[0], expected_cat, atol=1e-5)
    versioned = triton.infer(MODEL, [images_input([cat], binary=True)], model_version="1")
    np.testing.assert_allclose(versioned.as_numpy("probabilities")[0], expected_cat, atol=1e-5)


def test_triton_explanation_equals_explain(live, triton, cat):
    reference = explain_reference(live, cat)
    parameters = {"method": "gradcam", "target": f"{EGYPTIAN_CAT},tabby"}
    result = triton.infer(MODEL, [images_input([cat], binary=True)], parameters=parameters)
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
    chosen = triton.infer(MODEL, [images_input([cat], binary=False)], outputs=outputs, parameters=parameters)
    assert [o["name"] for o in chosen.get_response()["outputs"]] == ["heatmap", "overlay"]
    heatmap_text = chosen.as_numpy("heatmap")[0, 0]
    text = heatmap_text.decode() if isinstance(heatmap_text, bytes) else heatmap_text
    assert np.array_equal(pixels(base64.b64decode(text)), pixels(heatmaps[0, 0]))
    overlay = Image.open(io.BytesIO(chosen.as_numpy("overlay")[0, 1]))
    assert overlay.mode == "RGB" and overlay.size == (451, 300)


def test_v2_json_requests_with_httpx(live, cat):
    body = {"inputs": [{"name": "images", "shape": [1, 1], "datatype": "BYTES", "data": [[b64(cat)]]}]}
    response = httpx.post(f"{live}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    (output,) = response.json()["outputs"]
    assert output["shape"] == [1, 1000] and output["datatype"] == "FP32" and len(output["data"]) == 1000
    assert int(np.argmax(output["data"])) == EGYPTIAN_CAT
    assert httpx.get(f"{live}/v2/health/live").status_code == 200
    assert httpx.get(f"{live}/v2/health/ready").status_code == 200
    assert httpx.get(f"{live}/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}


# -- KServe v1 --------------------------------------------------------------------------------
def test_kserve_v1_verbs_give_predict_and_explain_answers(live, cat, coffee_photo):
    assert httpx.get(f"{live}/v1/models/{MODEL}").json() == {"name": MODEL, "ready": True}
    assert httpx.get(f"{live}/v1/models").json() == {"models": [MODEL]}
    instances = [{"image": {"b64": b64(cat)}}, {"image": {"b64": b64(coffee_photo)}}]
    predicted = httpx.post(f"{live}/v1/models/{MODEL}:predict", json={"instances": instances, "top_k": 3}, timeout=60)
    assert predicted.status_code == 200, predicted.text
    cat_prediction, coffee_prediction = predicted.json()["predictions"]
    reference = httpx.post(
        f"{live}/predict?top_k=3",
        files=[("image", ("a.jpg", cat, "image/jpeg")), ("image", ("b.jpg", coffee_photo, "image/jpeg"))],
        timeout=60,
    ).json()["results"]
    for ours, theirs in zip([cat_prediction, coffee_prediction], reference, strict=True):
        assert (ours["width"], ours["height"]) == (theirs["width"], theirs["height"])
        assert [p["index"] for p in ours["predictions"]] == [p["index"] for p in theirs["predictions"]]
        np.testing.assert_allclose(
            [p["score"] for p in ours["predictions"]], [p["score"] for p in theirs["predictions"]], atol=1e-5
        )

    body = {"instances": instances[:1], "method": "gradcam", "target": [EGYPTIAN_CAT, "tabby"], "raw": True}
    explained = httpx.post(f"{live}/v1/models/{MODEL}:explain", json=body, timeout=60)
    assert explained.status_code == 200, explained.text
    (ours,) = explained.json()["explanations"]
    theirs = explain_reference(live, cat)
    assert [e["index"] for e in ours["explanations"]] == [EGYPTIAN_CAT, TABBY]
    for mine, expected in zip(ours["explanations"], theirs["explanations"], strict=True):
        np.testing.assert_allclose(np.array(mine["cam"]), np.array(expected["cam"]), rtol=1e-5, atol=1e-6)
        assert np.array_equal(pixels(base64.b64decode(mine["heatmap"])), pixels(base64.b64decode(expected["heatmap"])))
        assert "overlay" not in mine


def test_both_protocols_take_the_picture_options(live, triton, cat):
    """overlay_format and size reach the pictures in v1 and v2 as in /explain; bad values are 422s naming them."""
    body = {"instances": [{"image": {"b64": b64(cat)}}], "overlay": True, "overlay_format": "jpeg", "size": 200}
    explained = httpx.post(f"{live}/v1/models/{MODEL}:explain", json=body, timeout=60)
    assert explained.status_code == 200, explained.text
    (mine,) = explained.json()["explanations"][0]["explanations"]
    overlay = Image.open(io.BytesIO(base64.b64decode(mine["overlay"])))
    heatmap = Image.open(io.BytesIO(base64.b64decode(mine["heatmap"])))
    assert (overlay.format, overlay.size) == ("JPEG", (200, 133))  # 451 x 300 with its longer side capped at 200
    assert (heatmap.format, heatmap.size) == ("PNG", (200, 133))
    assert explained.json()["explanations"][0]["explanations"][0]["overlay_media_type"] == "image/jpeg"

    outputs = [tritonclient_http.InferRequestedOutput(name) for name in ("heatmap", "overlay")]
    parameters = {"overlay_format": "webp", "size": "model"}
    result = triton.infer(MODEL, [images_input([cat], binary=True)], outputs=outputs, parameters=parameters)
    overlay = Image.open(io.BytesIO(result.as_numpy("overlay")[0, 0]))
    heatmap = Image.open(io.BytesIO(result.as_numpy("heatmap")[0, 0]))
    assert (overlay.format, overlay.size) == ("WEBP", (224, 224))
    assert (heatmap.format, heatmap.size) == ("PNG", (224, 224))

    v2_json = {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64(cat)]}]}
    bad = [
        httpx.post(f"{live}/v1/models/{MODEL}:explain", json={**body, "overlay_format": "gif"}, timeout=60),
        httpx.post(f"{live}/v1/models/{MODEL}:explain", json={**body, "size": 0}, timeout=60),
        httpx.post(f"{live}/v2/models/{MODEL}/infer", json={**v2_json, "parameters": {"size": "huge"}}, timeout=60),
        httpx.post(
            f"{live}/v2/models/{MODEL}/infer", json={**v2_json, "parameters": {"overlay_format": "bmp"}}, timeout=60
        ),
    ]
    for response, words in zip(bad, ["gif", "size 0", "size 'huge'", "bmp"], strict=True):
        assert response.status_code == 422 and words in response.json()["error"], response.text


# -- errors -----------------------------------------------------------------------------------
def binary_request(elements: list[bytes], **header_fields) -> tuple[bytes, dict[str, str]]:
    """A binary tensor data request body (JSON header + serialized BYTES tensor) and its headers."""
    blob = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    header = {
        "inputs": [
            {
                "name": "images",
                "shape": [len(elements)],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(blob)},
            }
        ],
        **header_fields,
    }
    text = json.dumps(header).encode()
    return text + blob, {"Inference-Header-Content-Length": str(len(text)), "content-type": "application/octet-stream"}


def test_errors_in_both_protocols(live, cat):
    v1 = f"{live}/v1/models"
    v2 = f"{live}/v2/models"
    good = [{"image": {"b64": b64(cat)}}]
    v2_json = {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64(cat)]}]}
    cases = [
        # (response, status, words in the error)
        (httpx.get(f"{v1}/nope"), 404, "unknown model 'nope'"),
        (httpx.post(f"{v1}/nope:predict", json={"instances": good}), 404, "unknown model"),
        (httpx.post(f"{v1}/{MODEL}:predict", json={"instances": [{"image": {"b64": "!!"}}]}), 400, "not valid base64"),
        (httpx.post(f"{v1}/{MODEL}:explain", json={"instances": good, "method": "nope"}), 422, "unknown CAM method"),
        (httpx.post(f"{v1}/{MODEL}:predict", json={"instances": good, "top_k": 0}), 422, "top_k"),
        (httpx.post(f"{v1}/{MODEL}:predict", json={"instances": [{"img": 1}]}), 422, "instances.0.image"),
        (httpx.post(f"{v1}/{MODEL}:predict", content=b"{", headers={"content-type": "application/json"}), 400, "JSON"),
        (httpx.post(f"{v1}/{MODEL}:predict", json={"instances": good * 5}), 413, "limit is 4"),
        (httpx.get(f"{v2}/nope"), 404, "unknown model 'nope'"),
        (httpx.get(f"{v2}/{MODEL}/versions/2"), 404, "no version '2'"),
        (httpx.post(f"{v2}/nope/infer", json=v2_json), 404, "unknown model"),
        (httpx.post(f"{v2}/{MODEL}/infer", json={"inputs": [{**v2_json["inputs"][0], "data": ["!!"]}]}), 400, "base64"),
        (httpx.post(f"{v2}/{MODEL}/infer", json={"inputs": [{**v2_json["inputs"][0], "data": [b64(b"no")]}]}), 400, ""),
        (httpx.post(f"{v2}/{MODEL}/infer", json={**v2_json, "parameters": {"method": "nope"}}), 422, "unknown CAM"),
        (httpx.post(f"{v2}/{MODEL}/infer", json={**v2_json, "parameters": {"target": "nope"}}), 422, "unknown label"),
        (httpx.post(f"{v2}/{MODEL}/infer", json={**v2_json, "parameters": {"layer": "_fc"}}), 422, "'_fc' outputs"),
        (httpx.post(f"{v2}/{MODEL}/infer", json={**v2_json, "parameters": {"metod": "x"}}), 422, "metod"),
        (httpx.post(f"{v2}/{MODEL}/infer", json={**v2_json, "outputs": [{"name": "logits"}]}), 422, "unknown output"),
        (httpx.post(f"{v2}/{MODEL}/infer", json={"inputs": [{**v2_json["inputs"][0], "shape": [2]}]}), 400, "shape"),
        (
            httpx.post(f"{v2}/{MODEL}/infer", json={"inputs": [{**v2_json["inputs"][0], "datatype": "FP32"}]}),
            400,
            "BYTES",
        ),
        (
            httpx.post(f"{v2}/{MODEL}/infer", json={"inputs": [{**v2_json["inputs"][0], "shape": [5]}]}),
            413,
            "limit is 4",
        ),
        (httpx.post(f"{v2}/{MODEL}/infer", content=b"{", headers={"content-type": "application/json"}), 400, "JSON"),
    ]
    body, headers = binary_request([cat])
    cases += [
        (httpx.post(f"{v2}/{MODEL}/infer", content=body[:-10], headers=headers), 400, "binary_data_size"),
        (
            httpx.post(
                f"{v2}/{MODEL}/infer", content=body, headers={**headers, "Inference-Header-Content-Length": "9999999"}
            ),
            400,
            "Inference-Header-Content-Length",
        ),
        (httpx.post(f"{v2}/{MODEL}/infer", content=body, headers={**headers, "content-encoding": "br"}), 415, "br"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (response.request.url, response.text)
        assert set(response.json()) == {"error"} and words in response.json()["error"], response.text
    # the own API keeps its {"detail"} bodies
    assert set(httpx.get(f"{live}/models/nope/layers").json()) == {"detail"}


def test_protocol_inputs_found_by_fuzzing_are_4xx_not_500(live, cat):
    v1, v2 = f"{live}/v1/models/{MODEL}", f"{live}/v2/models/{MODEL}/infer"
    good = {"instances": [{"image": {"b64": b64(cat)}}]}
    v2_json = {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64(cat)]}]}
    body, headers = binary_request([cat])
    nested = b"[" * 100_000 + b"]" * 100_000
    cases = [
        (httpx.get(f"{v1}:predict"), 405, "predict takes POST, not GET"),
        (httpx.post(f"{v1}:explain", json={**good, "target": "--5"}), 422, "unknown label '--5'"),
        (httpx.post(f"{v1}:explain", json={**good, "target": True}), 422, "target"),
        (httpx.post(f"{v1}:predict", json={**good, "top_k": True}), 422, "top_k"),
        (
            httpx.post(f"{v1}:predict", content=json.dumps(good), headers={"content-type": "text/plain"}),
            415,
            "text/plain",
        ),
        (
            httpx.post(f"{v1}:predict", content=b'{"instances": [}', headers={"content-type": "application/json"}),
            400,
            "the JSON body is malformed",
        ),
        (httpx.post(v2, json={**v2_json, "parameters": {"size": "\u00b2"}}), 422, "invalid size"),
        (httpx.post(v2, json={**v2_json, "parameters": {"target": True}}), 422, "target"),
        (httpx.post(v2, json={**v2_json, "parameters": {"target": "9" * 5000}}), 422, "unknown label"),
        (
            httpx.post(v2, content=b'{"id": ' + b"9" * 5000 + b"}", headers={"content-type": "application/json"}),
            400,
            "not valid JSON",
        ),
        (
            httpx.post(v2, content=body, headers={**headers, "Inference-Header-Content-Length": "9" * 5000}),
            400,
            "Length",
        ),
        (httpx.post(v2, json={**v2_json, "parameters": {"explain": False, "method": "gradcam"}}), 422, "explain=false"),
        (
            httpx.post(v2, json={**v2_json, "parameters": {"overlay": False}, "outputs": [{"name": "overlay"}]}),
            422,
            "the overlay output was requested with the parameter overlay=false",
        ),
        (httpx.post(v2, content=nested, headers={"content-type": "application/json"}), 400, "nested too deeply"),
        (httpx.post(v2, content=body, headers={**headers, "Inference-Header-Content-Length": b"\xb2"}), 400, "Length"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (response.request.url, response.text)
        assert words in response.json()["error"], response.text
    # false switches are not options: they neither explain nor contradict explain=false
    for parameters in ({"counterfactual": False}, {"explain": False, "counterfactual": False, "overlay": False}):
        response = httpx.post(v2, json={**v2_json, "parameters": parameters})
        assert [o["name"] for o in response.json()["outputs"]] == ["probabilities"], response.text


def test_triton_client_reports_the_protocol_error(triton, cat):
    with pytest.raises(tritonclient_http.InferenceServerException) as raised:
        triton.infer("nope", [images_input([cat], binary=True)])
    assert raised.value.status() == "404" and "unknown model 'nope'" in raised.value.message()


def test_binary_request_by_hand_and_gzip(live, cat, coffee_photo):
    import gzip

    body, headers = binary_request(
        [cat, coffee_photo], outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}]
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


def test_v2_goes_through_the_batching_queue(registry, cat, monkeypatch):
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
    body = {"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES", "data": [b64(cat), b64(cat)]}]}

    async def scenario():
        async with running_app(registry) as (client, _app):
            first = asyncio.create_task(client.post("/predict", content=cat, headers={"content-type": "image/jpeg"}))
            await asyncio.sleep(0.1)  # the first batch is computing; the next two requests queue behind it
            v2, v1 = await asyncio.gather(
                client.post(f"/v2/models/{MODEL}/infer", json=body),
                client.post(f"/v1/models/{MODEL}:predict", json={"instances": [{"image": {"b64": b64(cat)}}]}),
            )
            return (await first).status_code, v2.status_code, v1.status_code

    assert asyncio.run(scenario()) == (200, 200, 200)
    assert sizes == [1, 3]


# -- OpenAPI: documented examples are accepted ------------------------------------------------
def test_every_json_example_in_the_openapi_document_is_accepted(live):
    document = httpx.get(f"{live}/openapi.json").json()
    tried = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            content = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if content is None:
                continue
            schema = content["schema"]
            if "$ref" in schema:
                schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
            examples = [content["example"]] if "example" in content else schema.get("examples", [])
            assert examples, f"{method.upper()} {path} has no JSON request example"
            url = live + path.replace("{name}", MODEL).replace("{version}", "1")
            for example in examples:
                response = httpx.request(method, url, json=example, timeout=60)
                assert response.status_code == 200, (path, response.text)
                tried.append(path)
    assert len(tried) >= 6
    assert "<base64 of a JPEG>" not in json.dumps(document)
    image_schemas = [
        document["components"]["schemas"]["JsonExplainRequest"]["properties"]["images"]["items"],
        document["components"]["schemas"]["V1Base64"]["properties"]["b64"],
    ]
    assert all(s["contentEncoding"] == "base64" for s in image_schemas)


def test_schemathesis_finds_no_rejected_example_and_no_server_error(live, tmp_path):
    """The third-party fuzzer's own verdict on the document's examples (every check it runs by default)."""
    st = Path(sys.executable).parent / "st"
    command = [str(st)] if st.is_file() else [shutil.which("st") or pytest.skip("schemathesis is not installed")]
    result = subprocess.run(
        [*command, "run", f"{live}/openapi.json", "--phases=examples", "--no-color"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "passed" in result.stdout


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


def test_api_key_guards_the_protocols_but_not_their_health(registry, cat):
    import asyncio

    from tests.apphelpers import running_app

    async def scenario():
        async with running_app(registry, api_key="s3cret") as (client, _app):
            open_routes = [(await client.get(p)).status_code for p in ("/v2", "/v2/health/live", "/v2/health/ready")]
            refused = [await client.get(p) for p in (f"/v2/models/{MODEL}", f"/v1/models/{MODEL}")]
            with_key = await client.get(f"/v2/models/{MODEL}", headers={"Authorization": "Bearer s3cret"})
            return open_routes, refused, with_key.status_code

    open_routes, refused, with_key = asyncio.run(scenario())
    assert open_routes == [200, 200, 200] and with_key == 200
    assert all(r.status_code == 401 and "API key" in r.json()["error"] for r in refused)


# -- third-party clients: KServe's SDK, health bodies, GET / ----------------------------------
def test_v2_health_answers_the_json_bodies_kserve_sends(live):
    for path, body in (("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True})):
        response = httpx.get(f"{live}{path}")
        assert (response.status_code, response.headers["content-type"], response.json()) == (
            200,
            "application/json",
            body,
        )


def test_root_gives_browsers_the_page_and_other_clients_alive_json(live):
    browser = httpx.get(f"{live}/", headers={"accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert browser.status_code == 200 and browser.headers["content-type"].startswith("text/html")
    assert "<html" in browser.text.lower() and browser.headers["vary"] == "Accept"
    for accept in ("*/*", "application/json", None, "text/html;q=0, */*"):
        with httpx.Client() as client:
            del client.headers["accept"]  # httpx's default is */*, as KServe's SDK sends it
            answer = client.get(f"{live}/", headers={"accept": accept} if accept is not None else {})
        assert answer.request.headers.get("accept") == accept
        assert (answer.status_code, answer.headers["content-type"], answer.json()) == (
            200,
            "application/json",
            {"status": "alive"},
        ), accept
        assert answer.headers["vary"] == "Accept"


_KSERVE_SDK_PROBE = """
import asyncio, json, sys
from kserve import InferenceRESTClient, RESTConfig

async def main(url):
    answers = {}
    for protocol in ("v1", "v2"):
        client = InferenceRESTClient(RESTConfig(protocol=protocol, retries=0))
        try:
            answers[protocol] = {"live": await client.is_server_live(url)}
            if protocol == "v2":
                answers[protocol]["ready"] = await client.is_server_ready(url)
            answers[protocol]["model"] = await client.is_model_ready(url, sys.argv[2])
        finally:
            await client.close()
    print(json.dumps(answers))

asyncio.run(main(sys.argv[1]))
"""


def kserve_python() -> str:
    """An interpreter with KServe's SDK: CAMSERVE_KSERVE_PYTHON (a scratch venv with `pip install kserve`; the
    test extras do not bring it: it pulls grpcio and kubernetes), else this one when it has kserve."""
    import importlib.util
    import os

    python = os.environ.get("CAMSERVE_KSERVE_PYTHON")
    if python:
        return python
    if importlib.util.find_spec("kserve") is None:
        pytest.skip("KServe's SDK is not installed: set CAMSERVE_KSERVE_PYTHON to a python with `pip install kserve`")
    return sys.executable


def test_kserve_sdk_sees_the_server_live_and_ready_in_v1_and_v2(live, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(_KSERVE_SDK_PROBE)
    result = subprocess.run(
        [kserve_python(), str(script), live, MODEL], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert answers == {"v1": {"live": True, "model": True}, "v2": {"live": True, "ready": True, "model": True}}


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


# -- the OpenAPI document states what the server accepts (cases schemathesis --checks all found) -------
def test_v1_verbs_answer_405_allow_post_to_every_other_method(live):
    for verb in ("predict", "explain"):
        for method in ("GET", "OPTIONS", "PUT", "DELETE", "PATCH"):
            response = httpx.request(method, f"{live}/v1/models/{MODEL}:{verb}")
            assert (response.status_code, response.headers["allow"]) == (405, "POST"), (verb, method)
    status = httpx.request("OPTIONS", f"{live}/v1/models/{MODEL}")
    assert (status.status_code, status.headers["allow"]) == (405, "GET")


def test_a_raw_image_as_octet_stream_is_one_image_on_v2_infer(live, cat):
    expected = probabilities_from_predict(live, cat)
    for path in (f"/v2/models/{MODEL}/infer", f"/v2/models/{MODEL}/versions/1/infer"):
        response = httpx.post(
            f"{live}{path}", content=cat, headers={"content-type": "application/octet-stream"}, timeout=60
        )
        assert response.status_code == 200 and response.headers["content-type"] == "application/json", response.text
        (output,) = response.json()["outputs"]
        assert (output["name"], output["shape"]) == ("probabilities", [1, 1000])
        np.testing.assert_allclose(output["data"], expected, atol=1e-5)


def document_validator(document: dict, schema: dict):
    """A JSON Schema 2020-12 validator for `schema`, resolving `#/components/...` in `document`."""
    import jsonschema

    return jsonschema.Draft202012Validator({**schema, "components": document["components"]})


def test_requests_the_server_refuses_are_outside_the_document(live, cat):
    """schemathesis --checks all sent these as valid; the document now excludes them and the server still refuses."""
    document = httpx.get(f"{live}/openapi.json").json()
    paths = document["paths"]
    forms = {p: paths[p]["post"]["requestBody"]["content"]["multipart/form-data"] for p in ("/predict", "/explain")}
    multipart = {path: document_validator(document, form["schema"]) for path, form in forms.items()}
    v1 = document_validator(document, {"$ref": "#/components/schemas/V1PredictRequest"})
    v2 = document_validator(document, {"$ref": "#/components/schemas/V2InferenceRequest"})
    good_v2_input = {"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64(cat)]}
    assert v1.is_valid({"instances": [{"image": {"b64": b64(cat)}}]}) and v2.is_valid({"inputs": [good_v2_input]})

    for path, validator in multipart.items():
        assert validator.is_valid({"image": ["<file>"]}) and not validator.is_valid({"image": []})
        empty = httpx.post(
            f"{live}{path}", content=b"--b--\r\n", headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert empty.status_code == 400 and "no 'image' file field" in empty.json()["detail"], path

    assert not v1.is_valid({"instances": [{"image": {"b64": ""}}]})
    empty_b64 = httpx.post(f"{live}/v1/models/{MODEL}:predict", json={"instances": [{"image": {"b64": ""}}]})
    assert empty_b64.json() == {"error": "instances[0].image.b64 is empty"} and empty_b64.status_code == 400

    for wrong in ({"name": ""}, {"name": "pixels"}, {"datatype": "FP32"}, {"shape": [-1]}):
        fields = {**good_v2_input, **wrong}
        assert not v2.is_valid({"inputs": [fields]}), wrong
        response = httpx.post(f"{live}/v2/models/{MODEL}/infer", json={"inputs": [fields]})
        assert response.status_code == 400 and set(response.json()) == {"error"}, wrong
    assert not v2.is_valid({"inputs": [good_v2_input, good_v2_input]})
    assert v2.is_valid({"inputs": [{**good_v2_input, "shape": []}]})  # a scalar: one image, and accepted
    scalar = httpx.post(f"{live}/v2/models/{MODEL}/infer", json={"inputs": [{**good_v2_input, "shape": []}]})
    assert scalar.status_code == 200, scalar.text

    infer = paths["/v2/models/{name}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/octet-stream"]["schema"]["format"] == "binary"
    assert "Inference-Header-Content-Length" in infer["requestBody"]["description"]


def test_schemathesis_all_checks_on_the_protocols_find_nothing(live, tmp_path):
    """Every schemathesis check on the protocol routes (examples and the coverage phase's boundary values and
    unsupported methods) but positive-data acceptance, which needs real image files where the document can only say
    base64 (the cases it found are pinned above)."""
    st = Path(sys.executable).parent / "st"
    command = [str(st)] if st.is_file() else [shutil.which("st") or pytest.skip("schemathesis is not installed")]
    result = subprocess.run(
        [
            *command,
            "run",
            f"{live}/openapi.json",
            "--checks=all",
            "--exclude-checks=positive_data_acceptance",
            "--phases=examples,coverage",
            "--include-path-regex=^/v[12]",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout
