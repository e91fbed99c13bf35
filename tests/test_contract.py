"""One request contract: every option declared once (`camserve.options`), checked once into a plan (`camserve.plan`).

The plan tests need no HTTP; the protocol tests send the same bad value every way in and compare the answers.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from camserve.api.schemas import JsonExplainRequest
from camserve.api.schemas_v1 import V1ExplainRequest
from camserve.api.schemas_v2 import V2Parameters
from camserve.errors import InvalidParameterError, PayloadTooLargeError, UnknownModelError
from camserve.options import (
    MAX_TARGETS,
    ExplainOptions,
    ExplainQuery,
    PictureOptions,
    PredictOptions,
    describe_problems,
    pick,
)
from camserve.plan import ImagePayload, InferenceRequest, make_plan
from camserve.settings import Settings
from tests.apphelpers import running_app
from tests.conftest import jpeg_bytes

pytestmark = pytest.mark.anyio

OPTION_FIELDS = set(ExplainOptions.model_fields) | set(PictureOptions.model_fields)


def _problem(model: type, **values: object) -> str:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(values)
    return describe_problems(caught.value.errors())


# -- declarations -----------------------------------------------------------------------------------------------
def test_every_protocol_body_takes_the_options_with_the_same_defaults():
    """The JSON body, KServe v1 and OIP v2 parameters hold each option with the one declared default."""
    declared = {name: field.default for name, field in ExplainQuery.model_fields.items()}
    assert declared["method"] == "gradcampp" and declared["colormap"] == "jet" and declared["top_k"] == 5
    for model in (JsonExplainRequest, V1ExplainRequest, V2Parameters):
        for name in OPTION_FIELDS:
            assert model.model_fields[name].default == declared[name], (model.__name__, name)
            assert model.model_fields[name].description == ExplainQuery.model_fields[name].description


def test_a_bad_value_is_worded_once_whatever_model_reads_it():
    for values, words in (
        ({"colormap": ""}, "colormap: unknown colormap ''; use one of: jet"),
        ({"method": ""}, "method: unknown CAM method ''"),
        ({"overlay_format": "gif"}, "overlay_format: unknown overlay_format 'gif'"),
        ({"size": "huge"}, "size: invalid size 'huge'; use original, model"),
        ({"target": list(range(MAX_TARGETS + 1))}, f"target: {MAX_TARGETS + 1} targets requested; at most"),
    ):
        messages = {_problem(model, **values) for model in (ExplainQuery, V2Parameters)}
        messages.add(_problem(V1ExplainRequest, instances=[{"image": {"b64": "AA=="}}], **values))
        assert len(messages) == 1, messages
        assert messages.pop().startswith(words)


def test_values_are_parsed_by_their_declaration():
    options = ExplainQuery.model_validate({"method": "GradCAM++", "target": 285, "layer": "_swish", "size": "512"})
    assert options.method == "gradcampp" and options.targets == [285] and options.layers == ["_swish"]
    assert options.size == 512 and isinstance(options.size, int)
    assert ExplainQuery(size="model").size == "model"
    assert V2Parameters.model_validate({"target": "1, tabby", "layer": "a,b"}).targets == ["1", "tabby"]
    assert _problem(ExplainQuery, top_k=True) == "top_k: a boolean is not a number"


def test_a_field_the_body_gives_wins_over_the_query_and_unset_fields_keep_theirs():
    query = ExplainQuery.model_validate({"method": "gradcam", "colormap": "viridis", "top_k": 3})
    body = JsonExplainRequest.model_validate({"images": ["AA=="], "method": "layercam", "alpha": 0.2})
    merged = pick(ExplainQuery, query, body)
    assert (merged.method, merged.colormap, merged.alpha, merged.top_k) == ("layercam", "viridis", 0.2, 3)
    assert pick(PredictOptions, query, None).top_k == 3
    assert pick(PictureOptions, merged).model_fields_set == {"colormap", "alpha"}


# -- the plan, without HTTP -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cat(cat_jpeg) -> ImagePayload:
    return ImagePayload(cat_jpeg, "image/jpeg")


def _plan(registry, cat, settings: Settings | None = None, images: int = 1, **explain: object):
    request = InferenceRequest([cat] * images, top_k=7, explain=ExplainOptions.model_validate(explain))
    return make_plan(request, registry, settings or Settings())


def test_a_plan_resolves_classes_layers_and_steps_against_the_model(registry, cat):
    plan = _plan(registry, cat, target=["Egyptian cat", 281], layer=["_blocks.10", "_swish"], faithfulness=True)
    assert plan.served.name == "efficientnet-lite0" and plan.top_k == 7
    assert plan.classes == [285, 281]
    assert plan.explain is not None and plan.explain.layers == ("_blocks.10", "_swish")
    assert plan.explain.method == "gradcampp" and plan.explain.faithfulness_steps == Settings().faithfulness_steps
    assert _plan(registry, cat, faithfulness=True, faithfulness_steps=4).explain.faithfulness_steps == 4
    plain = make_plan(InferenceRequest([cat], top_k=5000), registry, Settings())
    assert plain.explain is None and plain.top_k == 1000  # top-k never above the class count


def test_a_plan_refuses_what_the_model_or_the_limits_cannot_do(registry, cat):
    labels_route = "see /models/efficientnet-lite0/labels"
    with pytest.raises(InvalidParameterError, match=f"unknown label 'Cheshire cat'.*{labels_route}"):
        _plan(registry, cat, target=["Cheshire cat"])
    with pytest.raises(InvalidParameterError, match="only meaningful with faithfulness=true"):
        _plan(registry, cat, faithfulness_steps=8)
    with pytest.raises(InvalidParameterError, match="nope"):
        _plan(registry, cat, layer=["nope"])
    with pytest.raises(UnknownModelError, match="unknown model 'nope'"):
        make_plan(InferenceRequest([cat], model="nope"), registry, Settings())
    with pytest.raises(PayloadTooLargeError, match="scorecam would run 2560 extra forward passes"):
        _plan(registry, cat, Settings(max_masked_forwards=2000), images=2, method="scorecam")
    with pytest.raises(PayloadTooLargeError, match="faithfulness scores for this request need 66 model forwards"):
        _plan(registry, cat, Settings(max_faithfulness_forwards=60), images=2, faithfulness=True)
    with pytest.raises(PayloadTooLargeError, match="5 images in one request; the limit is 4"):
        make_plan(InferenceRequest([cat] * 5), registry, Settings(max_images_per_request=4))


def test_the_render_budget_is_checked_from_the_image_headers_before_decoding(registry):
    big = ImagePayload(jpeg_bytes(np.zeros((2000, 3000, 3), np.uint8)), "image/jpeg")  # 6 MP
    settings = Settings(max_render_pixels=20_000_000)
    request = InferenceRequest([big] * 2, explain=ExplainOptions(), pictures=PictureOptions(overlay=True))
    with pytest.raises(PayloadTooLargeError, match="render 48.0 megapixels of heatmaps and overlays"):
        make_plan(request, registry, settings)
    smaller = InferenceRequest([big] * 2, explain=ExplainOptions(), pictures=PictureOptions(overlay=True, size=512))
    assert make_plan(smaller, registry, settings).explain is not None


# -- every way in -----------------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.mark.parametrize(
    ("option", "bad"),
    [("colormap", ""), ("method", ""), ("alpha", 2), ("size", "0"), ("overlay_format", "gif"), ("target", "nope")],
)
async def test_a_bad_option_gets_the_same_status_and_message_whichever_protocol_carried_it(registry, option, bad):
    photo = np.asarray(Image.new("RGB", (64, 48), (200, 120, 40)))
    image = jpeg_bytes(photo)
    async with running_app(registry) as (client, _app):
        query = await client.post(
            "/explain", params={option: str(bad)}, content=image, headers={"content-type": "image/jpeg"}
        )
        as_json = await client.post("/explain", json={"images": [_b64(image)], option: bad})
        v1 = await client.post(
            "/v1/models/efficientnet-lite0:explain", json={"instances": [{"image": {"b64": _b64(image)}}], option: bad}
        )
        v2 = await client.post(
            "/v2/models/efficientnet-lite0/infer",
            json={
                "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [_b64(image)]}],
                "parameters": {option: bad},
            },
        )
    answers = [query.json()["detail"], as_json.json()["detail"], v1.json()["error"], v2.json()["error"]]
    assert [r.status_code for r in (query, as_json, v1, v2)] == [422] * 4, answers
    if option == "alpha":  # the query string carries text: 2 arrives as "2", the bound is the same
        answers = [a.replace("'2'", "2") for a in answers]
    assert len(set(answers)) == 1, answers
    named = "unknown label 'nope'" if option == "target" else f"{option}: "  # the plan's checks name the value
    assert answers[0].startswith(named), answers[0]


def test_the_cli_flags_are_the_declared_options():
    from camserve.cli import _option_params, build_parser

    parser = build_parser()
    explain = next(a for a in parser._subparsers._group_actions[0].choices["explain"]._actions if a.dest == "alpha")
    assert explain.help == PictureOptions.model_fields["alpha"].description + "; default 0.5"
    args = parser.parse_args(["explain", "x.jpg", "--target", "1", "--target", "tabby", "--alpha", "0.3"])
    assert _option_params(args) == [("target", "1"), ("target", "tabby"), ("alpha", "0.3")]
    args = parser.parse_args(["explain", "x.jpg", "--counterfactual", "--faithfulness-steps", "8"])
    assert _option_params(args) == [("counterfactual", "true"), ("faithfulness_steps", "8")]


def test_the_document_describes_exactly_the_values_the_checks_accept():
    """colormap and overlay_format are enums; size's number, names and digit strings match what the check parses."""
    import re

    from camserve.options import parse_picture_size

    schema = ExplainQuery.model_json_schema()["properties"]
    assert schema["colormap"]["enum"] == ["jet", "turbo", "viridis", "inferno", "magma"]
    assert schema["overlay_format"]["enum"] == ["png", "jpeg", "webp"]
    number, names, digits = schema["size"]["anyOf"]
    assert (number["minimum"], number["maximum"], names["enum"]) == (1, 8192, ["original", "model"])
    pattern = re.compile(digits["pattern"])

    def parses(text: str) -> bool:
        try:
            parse_picture_size(text)
        except ValueError:
            return False
        return True

    texts = [str(side) for side in range(0, 9000)] + ["0008", "00", "+5", " 5", "5 ", "08193", "-1", "1e3", "model"]
    assert [t for t in texts if bool(pattern.match(t)) != parses(t) and t != "model"] == []
