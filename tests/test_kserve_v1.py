"""KServe v1 against a live server: :predict and :explain give the same answers as /predict and /explain, the verbs
take POST only, and GET / answers KServe's liveness probe."""

from __future__ import annotations

import base64

import httpx
import numpy as np

from tests.protocolhelpers import EGYPTIAN_CAT, MODEL, TABBY, b64, explain_reference, pixels


def test_kserve_v1_verbs_give_predict_and_explain_answers(live, cat_jpeg, coffee_jpeg):
    assert httpx.get(f"{live}/v1/models/{MODEL}").json() == {"name": MODEL, "ready": True}
    assert httpx.get(f"{live}/v1/models").json() == {"models": [MODEL]}
    instances = [{"image": {"b64": b64(cat_jpeg)}}, {"image": {"b64": b64(coffee_jpeg)}}]
    predicted = httpx.post(f"{live}/v1/models/{MODEL}:predict", json={"instances": instances, "top_k": 3}, timeout=60)
    assert predicted.status_code == 200, predicted.text
    cat_prediction, coffee_prediction = predicted.json()["predictions"]
    reference = httpx.post(
        f"{live}/predict?top_k=3",
        files=[("image", ("a.jpg", cat_jpeg, "image/jpeg")), ("image", ("b.jpg", coffee_jpeg, "image/jpeg"))],
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
    theirs = explain_reference(live, cat_jpeg)
    assert [e["index"] for e in ours["explanations"]] == [EGYPTIAN_CAT, TABBY]
    for mine, expected in zip(ours["explanations"], theirs["explanations"], strict=True):
        np.testing.assert_allclose(np.array(mine["cam"]), np.array(expected["cam"]), rtol=1e-5, atol=1e-6)
        assert np.array_equal(pixels(base64.b64decode(mine["heatmap"])), pixels(base64.b64decode(expected["heatmap"])))
        assert "overlay" not in mine


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


def test_v1_verbs_answer_405_allow_post_to_every_other_method(live):
    for verb in ("predict", "explain"):
        for method in ("GET", "OPTIONS", "PUT", "DELETE", "PATCH"):
            response = httpx.request(method, f"{live}/v1/models/{MODEL}:{verb}")
            assert (response.status_code, response.headers["allow"]) == (405, "POST"), (verb, method)
    status = httpx.request("OPTIONS", f"{live}/v1/models/{MODEL}")
    assert (status.status_code, status.headers["allow"]) == (405, "GET")
