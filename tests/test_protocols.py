"""Both protocols at once (KServe v1 and the Open Inference Protocol v2) against a live server: the picture options,
errors in the protocols' form, inputs a fuzzer found, the API key, KServe's SDK in v1 and v2, and the OpenAPI
document's examples and limits checked by hand and by schemathesis."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.protocolhelpers import MODEL, b64, binary_request, images_input, tritonclient_http


def test_both_protocols_take_the_picture_options(live, triton, cat_jpeg):
    """overlay_format and size reach the pictures in v1 and v2 as in /explain; bad values are 422s naming them."""
    body = {"instances": [{"image": {"b64": b64(cat_jpeg)}}], "overlay": True, "overlay_format": "jpeg", "size": 200}
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
    result = triton.infer(MODEL, [images_input([cat_jpeg], binary=True)], outputs=outputs, parameters=parameters)
    overlay = Image.open(io.BytesIO(result.as_numpy("overlay")[0, 0]))
    heatmap = Image.open(io.BytesIO(result.as_numpy("heatmap")[0, 0]))
    assert (overlay.format, overlay.size) == ("WEBP", (224, 224))
    assert (heatmap.format, heatmap.size) == ("PNG", (224, 224))

    v2_json = {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64(cat_jpeg)]}]}
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


def test_errors_in_both_protocols(live, cat_jpeg):
    v1 = f"{live}/v1/models"
    v2 = f"{live}/v2/models"
    good = [{"image": {"b64": b64(cat_jpeg)}}]
    v2_json = {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64(cat_jpeg)]}]}
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
    body, headers = binary_request([cat_jpeg])
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


def test_protocol_inputs_found_by_fuzzing_are_4xx_not_500(live, cat_jpeg):
    v1, v2 = f"{live}/v1/models/{MODEL}", f"{live}/v2/models/{MODEL}/infer"
    good = {"instances": [{"image": {"b64": b64(cat_jpeg)}}]}
    v2_json = {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64(cat_jpeg)]}]}
    body, headers = binary_request([cat_jpeg])
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


def test_api_key_guards_the_protocols_but_not_their_health(registry, cat_jpeg):
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


def document_validator(document: dict, schema: dict):
    """A JSON Schema 2020-12 validator for `schema`, resolving `#/components/...` in `document`."""
    import jsonschema

    return jsonschema.Draft202012Validator({**schema, "components": document["components"]})


def test_requests_the_server_refuses_are_outside_the_document(live, cat_jpeg):
    """schemathesis --checks all sent these as valid; the document now excludes them and the server still refuses."""
    document = httpx.get(f"{live}/openapi.json").json()
    paths = document["paths"]
    forms = {p: paths[p]["post"]["requestBody"]["content"]["multipart/form-data"] for p in ("/predict", "/explain")}
    multipart = {path: document_validator(document, form["schema"]) for path, form in forms.items()}
    v1 = document_validator(document, {"$ref": "#/components/schemas/V1PredictRequest"})
    v2 = document_validator(document, {"$ref": "#/components/schemas/V2InferenceRequest"})
    good_v2_input = {"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64(cat_jpeg)]}
    assert v1.is_valid({"instances": [{"image": {"b64": b64(cat_jpeg)}}]}) and v2.is_valid({"inputs": [good_v2_input]})

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
