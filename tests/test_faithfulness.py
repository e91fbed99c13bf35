"""Faithfulness scores of single explanations: by hand, against an independent computation on real photos (engine
module and HTTP API), and the API's parameter checks."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from scipy.ndimage import gaussian_filter

from camserve.cam import CamEngine, faithfulness
from camserve.images import decode_image, preprocess
from camserve.settings import Settings
from tests.apphelpers import running_app
from tests.conftest import to_lite_input

EGYPTIAN_CAT, TABBY = 285, 281
LITE = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


# -- an independent computation, straight from the definitions ----------------------------------------------
def independent(model, x: torch.Tensor, cam: np.ndarray, cls: int, mean, std, steps: int) -> dict[str, float]:
    """drop, increase, deletion AUC, insertion AUC of one map `cam` [h, w] for class `cls` of the normalized image
    x [1, 3, H, W], written without service.cam: numpy ranking and trapezoid, scipy's Gaussian filter."""
    height, width = x.shape[-2:]
    m = F.interpolate(torch.from_numpy(cam).float()[None, None], size=(height, width), mode="bilinear")[0, 0]
    m = (m - m.min()) / (m.max() - m.min())
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def probability(batch: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(model(batch), dim=1)[:, cls].double().numpy()

    pixels = x * std_t + mean_t  # in [0, 1]
    y, o = probability(torch.cat([x, (pixels * m - mean_t) / std_t]))
    order = np.argsort(-m.numpy().ravel(), kind="stable")  # most salient first, ties in row-major order
    blur = torch.from_numpy(gaussian_filter(x.numpy(), sigma=5, radius=5, mode="mirror", axes=(2, 3)))
    deleted, inserted = [], []
    for k in range(steps + 1):
        moved = np.zeros(height * width, dtype=bool)
        moved[order[: k * height * width // steps]] = True
        moved_t = torch.from_numpy(moved.reshape(height, width))
        deleted.append(torch.where(moved_t, 0.0, x[0]))
        inserted.append(torch.where(moved_t, x[0], blur[0]))
    deletion, insertion = probability(torch.stack(deleted)), probability(torch.stack(inserted))
    return {
        "drop": max(0.0, y - o) / y,
        "increase": float(y < o),
        "deletion_auc": float(np.trapezoid(deletion, dx=1 / steps)),
        "insertion_auc": float(np.trapezoid(insertion, dx=1 / steps)),
    }


def assert_scores(actual: dict[str, float], expected: dict[str, float]) -> None:
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=2e-4), (key, actual, expected)


# -- by hand -------------------------------------------------------------------------------------------------
def toy_predict(x: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax is [q, 1 - q] for 12 x 12 images seen as 2 x 2 blocks of 6 x 6 pixels: q = 0.1 + 0.8 *
    (w . the blocks' mean channel-0 pixel), pixels = x * 0.5 + 0.5, w = [[0.4, 0.3], [0.2, 0.1]]."""
    w = torch.tensor([[0.4, 0.3], [0.2, 0.1]])
    q = 0.1 + 0.8 * (F.avg_pool2d(x[:, :1] * 0.5 + 0.5, 6)[:, 0] * w).sum(dim=(1, 2))
    return torch.stack([q.log(), (1 - q).log()], dim=1)


def blocks(values: list[list[float]]) -> torch.Tensor:
    """[1, 12, 12]: each of the 2 x 2 values repeated over its 6 x 6 block."""
    return torch.tensor(values).repeat_interleave(6, 0).repeat_interleave(6, 1)[None]


def test_scores_worked_out_by_hand():
    x = torch.ones(1, 3, 12, 12)  # white: pixels 1, q = 0.9
    cam = blocks([[0.0, 1.0], [2.0, 3.0]])  # normalized [[0, 1/3], [2/3, 1]]: bottom right block first
    y = torch.tensor([0.9, 0.1])
    scores = faithfulness.evaluate(toy_predict, x, cam.expand(2, 12, 12), [0, 0], [0, 1], y, steps=4, chunk=3, **LITE)
    # masked: w . m = 0.3/3 + 0.2*2/3 + 0.1 = 1/3, so O = 0.1 + 0.8/3 for class 0 and 0.9 - 0.8/3 for class 1
    o = 0.1 + 0.8 / 3
    torch.testing.assert_close(scores.drop, torch.tensor([(0.9 - o) / 0.9, 0.0]))
    torch.testing.assert_close(scores.increase, torch.tensor([0.0, 1.0]))
    # a step deletes one block (36 of 144 pixels) to the normalized 0 (pixel 0.5): q loses 0.8 * 0.5 * its w
    curve = torch.tensor([0.9, 0.86, 0.78, 0.66, 0.5])
    torch.testing.assert_close(scores.deletion, torch.stack([curve, 1 - curve]))
    torch.testing.assert_close(scores.deletion_auc, torch.tensor([0.75, 0.25]))
    # a constant image is its own blur: insertion stays at Y
    torch.testing.assert_close(scores.insertion, torch.tensor([[0.9] * 5, [0.1] * 5]))
    torch.testing.assert_close(scores.table()[0], torch.tensor([(0.9 - o) / 0.9, 0.0, 0.75, 0.9]))


def test_a_constant_map_masks_everything_and_deletes_in_row_major_order():
    """A constant map normalizes to all zeros: O is the score of the black image; ties are deleted row by row."""
    x = torch.ones(1, 3, 12, 12)
    scores = faithfulness.evaluate(toy_predict, x, torch.ones(1, 3, 3), [0], [0], torch.tensor([0.9]), steps=2, **LITE)
    torch.testing.assert_close(scores.drop, torch.tensor([(0.9 - 0.1) / 0.9]))  # black: q = 0.1
    # a step of 72 pixels: the top six rows (blocks w 0.4 and 0.3) go first
    torch.testing.assert_close(scores.deletion[0], torch.tensor([0.9, 0.9 - 0.4 * 0.7, 0.5]))
    assert faithfulness.forwards_per_explanation(2) == 5 and faithfulness.step_counts(4, 2) == [0, 2, 4]
    assert faithfulness.step_counts(10, 4) == [0, 2, 5, 7, 10]


def test_evaluate_refuses_mismatched_rows():
    with pytest.raises(ValueError, match="2 maps, 1 images"):
        faithfulness.evaluate(
            toy_predict, torch.ones(1, 3, 12, 12), torch.ones(2, 2, 2), [0], [0], torch.ones(2), **LITE
        )


# -- engine module on real photos ----------------------------------------------------------------------------
def test_engine_scores_equal_an_independent_computation(lite0, chelsea, coffee):
    engine = CamEngine(lite0)
    x = torch.cat([to_lite_input(chelsea), to_lite_input(coffee)])
    result = engine.explain(x, [[EGYPTIAN_CAT, TABBY], None], method="gradcampp")
    probabilities = torch.softmax(result.logits, dim=1)[result.image_index, result.class_index]
    images, classes = [i for i, _ in result.pairs], [c for _, c in result.pairs]
    # 3 rows x 9 forwards in chunks of 5: chunks cross rows
    scores = faithfulness.evaluate(
        engine.predict, x, result.maps, images, classes, probabilities, steps=4, chunk=5, **LITE
    )
    assert scores.deletion.shape == scores.insertion.shape == (3, 5)
    for row, (i, cls) in enumerate(result.pairs):
        expected = independent(lite0, x[i : i + 1], result.maps[row].numpy(), cls, LITE["mean"], LITE["std"], 4)
        actual = dict(
            zip(("drop", "increase", "deletion_auc", "insertion_auc"), scores.table()[row].tolist(), strict=True)
        )
        assert_scores(actual, expected)
    # the cat's own map is more faithful than the tabby's on the same photo
    assert scores.insertion_auc[0] > scores.insertion_auc[1]


# -- through the HTTP API ------------------------------------------------------------------------------------
KEYS = ("drop", "increase", "deletion_auc", "insertion_auc")


@pytest.mark.anyio
async def test_explain_faithfulness_equals_an_independent_computation(registry, cat_jpeg, coffee_jpeg):
    jpegs = [cat_jpeg, coffee_jpeg]
    files = [("image", (f"{n}.jpg", data, "image/jpeg")) for n, data in enumerate(jpegs)]
    async with running_app(registry) as (client, _app):
        scored = await client.post("/explain?raw=true&faithfulness=true&faithfulness_steps=4", files=files)
        plain = await client.post("/explain?raw=true", files=files)
    assert scored.status_code == plain.status_code == 200, scored.text
    served = registry.get()
    for jpeg, result, unscored in zip(jpegs, scored.json()["results"], plain.json()["results"], strict=True):
        (entry,) = result["explanations"]
        x = preprocess([decode_image(jpeg).pixels], served.input_size, served.mean, served.std)
        cam = np.asarray(entry["cam"], dtype=np.float32)
        expected = independent(served.module, x, cam, entry["index"], served.mean, served.std, steps=4)
        assert entry["faithfulness"]["steps"] == 4 and set(entry["faithfulness"]) == {*KEYS, "steps"}
        assert_scores(entry["faithfulness"], expected)
        # without faithfulness=true the explanation is the same, without the key
        (same,) = unscored["explanations"]
        assert "faithfulness" not in same
        assert same["heatmap"] == entry["heatmap"] and same["score"] == pytest.approx(entry["score"], abs=1e-6)
    cat, cup = (r["explanations"][0]["faithfulness"] for r in scored.json()["results"])
    assert cat != cup


@pytest.mark.anyio
async def test_faithfulness_through_every_protocol_and_the_default_steps_setting(registry, cat_jpeg):
    jpeg = cat_jpeg
    b64 = base64.b64encode(jpeg).decode()
    v2_input = {"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64]}
    async with running_app(registry, faithfulness_steps=2) as (client, _app):
        query = await client.post(
            "/explain?faithfulness=true&faithfulness_steps=2", content=jpeg, headers={"content-type": "image/jpeg"}
        )
        default = await client.post("/explain", json={"images": [b64], "faithfulness": True})
        v1 = await client.post(
            "/v1/models/efficientnet-lite0:explain",
            json={"instances": [{"image": {"b64": b64}}], "faithfulness": True, "faithfulness_steps": 2},
        )
        v2 = await client.post(
            "/v2/models/efficientnet-lite0/infer",
            json={"inputs": [v2_input], "parameters": {"faithfulness": True, "faithfulness_steps": 2}},
        )
        v2_output = await client.post(  # asking for the output is enough
            "/v2/models/efficientnet-lite0/infer", json={"inputs": [v2_input], "outputs": [{"name": "faithfulness"}]}
        )
        v2_refused = [
            await client.post("/v2/models/efficientnet-lite0/infer", json={"inputs": [v2_input], "parameters": p})
            for p in ({"faithfulness": True, "explain": False}, {"faithfulness_steps": 4})
        ]
        v2_contradiction = await client.post(
            "/v2/models/efficientnet-lite0/infer",
            json={"inputs": [v2_input], "parameters": {"faithfulness": False}, "outputs": [{"name": "faithfulness"}]},
        )
    for response in (query, default, v1, v2, v2_output):
        assert response.status_code == 200, response.text
    expected = query.json()["results"][0]["explanations"][0]["faithfulness"]
    assert expected["steps"] == 2
    for body in (default.json()["results"][0], v1.json()["explanations"][0]):
        scores = body["explanations"][0]["faithfulness"]
        assert scores["steps"] == 2
        for key in KEYS:
            assert scores[key] == pytest.approx(expected[key], abs=1e-5)
    outputs = {o["name"]: o for o in v2.json()["outputs"]}
    assert list(outputs) == ["probabilities", "explained_class", "cam", "heatmap", "faithfulness"]
    (only,) = v2_output.json()["outputs"]
    for output in (outputs["faithfulness"], only):
        assert output["datatype"] == "FP32" and output["shape"] == [1, 1, 4]
        np.testing.assert_allclose(output["data"], [expected[key] for key in KEYS], atol=1e-5)
    assert [r.status_code for r in v2_refused] == [422, 422]
    assert "explain=false" in v2_refused[0].json()["error"] and "only meaningful" in v2_refused[1].json()["error"]
    assert v2_contradiction.status_code == 422 and "faithfulness=false" in v2_contradiction.json()["error"]
    assert Settings().faithfulness_steps == 16
    with pytest.raises(ValidationError):
        Settings(faithfulness_steps=65)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "params", "body", "fragment"),
    [
        ("/explain", {"faithfulness_steps": "4"}, None, "faithfulness_steps is only meaningful with faithfulness=true"),
        ("/explain", {"faithfulness": "false", "faithfulness_steps": "4"}, None, "only meaningful"),
        ("/explain", {"faithfulness": "true", "faithfulness_steps": "1"}, None, "faithfulness_steps: "),
        ("/explain", {"faithfulness": "true", "faithfulness_steps": "65"}, None, "faithfulness_steps: "),
        ("/explain", {"faithfulness": "true", "faithfulness_steps": "x"}, None, "faithfulness_steps: "),
        ("/explain", {"faithfulness": "maybe"}, None, "faithfulness: "),
        ("/explain", {}, {"faithfulness_steps": 8}, "only meaningful"),
        ("/explain", {}, {"faithfulness": True, "faithfulness_steps": 100}, "less than or equal to 64"),
        ("/v1/models/efficientnet-lite0:explain", {}, {"faithfulness_steps": 3}, "only meaningful"),
        ("/v1/models/efficientnet-lite0:explain", {}, {"faithfulness": True, "faithfulness_steps": 0}, "or equal to 2"),
    ],
)
async def test_bad_faithfulness_parameters_are_a_422_naming_them(registry, cat_jpeg, path, params, body, fragment):
    jpeg = cat_jpeg
    b64 = base64.b64encode(jpeg).decode()
    async with running_app(registry) as (client, _app):
        if path.startswith("/v1"):
            response = await client.post(path, json={"instances": [{"image": {"b64": b64}}], **body})
        elif body is not None:
            response = await client.post(path, params=params, json={"images": [b64], **body})
        else:
            response = await client.post(path, params=params, content=jpeg, headers={"content-type": "image/jpeg"})
    assert response.status_code == 422, response.text
    message = response.json().get("detail") or response.json()["error"]
    assert fragment in message, message


@pytest.mark.anyio
async def test_faithfulness_past_the_forward_budget_is_a_413(registry, cat_jpeg):
    jpeg = cat_jpeg
    async with running_app(registry, max_faithfulness_forwards=10) as (client, _app):
        one = await client.post(
            "/explain?faithfulness=true&faithfulness_steps=4", content=jpeg, headers={"content-type": "image/jpeg"}
        )
        two = await client.post(
            "/explain?faithfulness=true&faithfulness_steps=4&target=1&target=2",
            content=jpeg,
            headers={"content-type": "image/jpeg"},
        )
    assert one.status_code == 200, one.text  # 1 x 1 x (1 + 2 x 4) = 9 forwards
    assert two.status_code == 413 and "need 18 model forwards" in two.json()["detail"], two.text
