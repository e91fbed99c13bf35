"""Heads: a multi-label (sigmoid) or single-logit model gets independent probabilities everywhere, not softmax."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from camserve.cam.engine import CamEngine
from camserve.cam.heads import probabilities
from camserve.cam.perturbation import ScoreCAM
from camserve.images import decode_image, preprocess
from camserve.models import ModelSpec, load_model
from camserve.models.errors import ModelConfigError
from tests.apphelpers import running_app

JPEG = {"content-type": "image/jpeg"}
NUM_LABELS = 6


@pytest.fixture(scope="module")
def multilabel_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=224,
        patch_size=16,
        num_labels=NUM_LABELS,
        id2label={i: f"finding{i}" for i in range(NUM_LABELS)},
        label2id={f"finding{i}": i for i in range(NUM_LABELS)},
        problem_type="multi_label_classification",
    )
    model = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():  # spread the logits so that thresholds pick a few classes
        model.classifier.weight.mul_(40.0)
    folder = tmp_path_factory.mktemp("multilabel")
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def _models_file(folder, tmp_path, head: str | None = None):
    extra = f'head = "{head}"\n' if head else ""
    path = tmp_path / "models.toml"
    path.write_text(f'[[models]]\nname = "xray"\nkind = "huggingface"\npath = "{folder}"\n{extra}')
    return path


def test_a_head_that_contradicts_the_model_stops_start_up(multilabel_folder):
    spec = ModelSpec(name="xray", kind="huggingface", path=multilabel_folder, head="softmax")
    with pytest.raises(ModelConfigError, match="head = 'softmax' contradicts the model .*problem_type.*: sigmoid"):
        load_model(spec, torch.device("cpu"), warmup=False)
    binary = ModelSpec(name="b", kind="entrypoint", entrypoint="tests.fixtures.tiny_models:binary_classifier")
    assert load_model(binary, torch.device("cpu"), warmup=False).head == "sigmoid"  # one logit: sigmoid by itself
    with pytest.raises(ModelConfigError, match="contradicts the model \\(it has a single output: sigmoid\\)"):
        load_model(binary.model_copy(update={"head": "softmax"}), torch.device("cpu"), warmup=False)


@pytest.mark.anyio
async def test_a_multi_label_model_scores_each_class_with_its_sigmoid_on_every_protocol(
    multilabel_folder, tmp_path, cat_jpeg
):
    async with running_app(None, models_file=_models_file(multilabel_folder, tmp_path), warmup=False) as (
        client,
        app,
    ):
        listed = (await client.get("/models")).json()["models"][0]
        served = app.state.service.model("xray")
        image = decode_image(cat_jpeg).pixels
        x = preprocess([image], served.input_size, served.mean, served.std, interpolation=served.interpolation)
        expected = torch.sigmoid(served.engine.predict(x)[0].float()).numpy()
        order = np.argsort(-expected, kind="stable")
        threshold = float(expected[order[2]])  # the three most probable classes are at or above it
        everything = (await client.post(f"/predict?top_k={NUM_LABELS}", content=cat_jpeg, headers=JPEG)).json()
        above = (await client.post(f"/predict?top_k=1&threshold={threshold}", content=cat_jpeg, headers=JPEG)).json()
        explained = (await client.post(f"/explain?threshold={threshold}", content=cat_jpeg, headers=JPEG)).json()
        at_least_one = (await client.post("/explain?threshold=1", content=cat_jpeg, headers=JPEG)).json()
        b64 = base64.b64encode(cat_jpeg).decode()
        v1 = (await client.post("/v1/models/xray:predict", json={"instances": [{"image": {"b64": b64}}]})).json()
        v2 = (
            await client.post(
                "/v2/models/xray/infer",
                json={"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64]}]},
            )
        ).json()
    assert listed["head"] == everything["head"] == explained["head"] == v1["head"] == "sigmoid"
    assert v2["parameters"] == {"head": "sigmoid"}
    scores = {p["index"]: p["score"] for p in everything["results"][0]["predictions"]}
    assert np.allclose([scores[i] for i in range(NUM_LABELS)], expected, atol=1e-5)
    assert abs(sum(scores.values()) - 1.0) > 0.05  # independent probabilities, not a distribution
    assert np.allclose(v2["outputs"][0]["data"], expected, atol=1e-5)
    assert [p["index"] for p in above["results"][0]["predictions"]] == order[:3].tolist()
    assert [e["index"] for e in explained["results"][0]["explanations"]] == order[:3].tolist()
    assert [e["score"] for e in explained["results"][0]["explanations"]] == pytest.approx(expected[order[:3]], abs=1e-5)
    assert [e["index"] for e in at_least_one["results"][0]["explanations"]] == order[:1].tolist()


@pytest.mark.anyio
async def test_classes_above_the_threshold_are_explained_as_far_as_the_render_budget_holds(
    multilabel_folder, tmp_path, cat_jpeg
):
    """Budgets are checked before the forward, which decides how many classes pass: the cap follows the budget."""
    two_maps = 2 * 224 * 224  # size=model pictures, no overlays
    models_file = _models_file(multilabel_folder, tmp_path)
    async with running_app(None, models_file=models_file, warmup=False, max_render_pixels=two_maps) as (client, _):
        url = "/explain?threshold=0&size=model&overlay=false"
        capped = await client.post(url, content=cat_jpeg, headers=JPEG)
        overlays = await client.post("/explain?threshold=0&size=model&overlay=true", content=cat_jpeg, headers=JPEG)
        explicit = await client.post(url + "&target=0&target=1&target=2", content=cat_jpeg, headers=JPEG)
    assert capped.status_code == 200, capped.text
    results = capped.json()["results"][0]
    assert [e["index"] for e in results["explanations"]] == [p["index"] for p in results["predictions"][:2]]
    assert overlays.status_code == 413  # one map with its overlay is already above the budget
    assert explicit.status_code == 413  # named targets are counted before, as always


def test_score_cam_weighs_channels_by_the_heads_own_probability():
    """Score-CAM's confidence is the model's probability: sigmoid on a sigmoid head, computed here by hand."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).eval()
    with torch.no_grad():
        model[4].weight.mul_(30.0)  # confidences far apart, where softmax and sigmoid disagree
    x = torch.rand(1, 3, 16, 16)
    maps = {}
    for head in ("softmax", "sigmoid"):
        engine = CamEngine(model, default_layer="1", head=head)
        maps[head] = engine.explain(x, [[2]], method="scorecam", layers="1").maps[0]
    with torch.no_grad():
        features = model[1](model[0](x))[0]  # [4, 16, 16]
        masks = ScoreCAM().masks(features, (16, 16))
        confidence = torch.sigmoid(model(x * masks))[:, 2]
        expected = torch.relu((torch.softmax(confidence, dim=0)[:, None, None] * features).sum(0))
    torch.testing.assert_close(maps["sigmoid"], expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(maps["sigmoid"], maps["softmax"], atol=1e-4)


def test_probabilities_follow_the_head():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    torch.testing.assert_close(probabilities(logits, "sigmoid"), torch.sigmoid(logits))
    torch.testing.assert_close(probabilities(logits, "softmax"), F.softmax(logits, dim=1))
