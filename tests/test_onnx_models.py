"""kind = "onnx": ONNX files served by ONNX Runtime, explained by the methods that need no gradient."""

from __future__ import annotations

import base64
import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import torchvision
from PIL import Image

from camserve.cam.engine import CamEngine
from camserve.images import decode_image, preprocess
from camserve.models import ModelRegistry, ModelSpec, load_model
from camserve.models.errors import ModelConfigError
from tests.apphelpers import running_app

JPEG = {"content-type": "image/jpeg"}
pytestmark = pytest.mark.anyio
RESNET_SIZE = 96  # a 3x3 grid at layer4: small enough for Score-CAM in CI
VIT_SIZE = 64  # a 4x4 patch grid


def export(module: torch.nn.Module, size: int, path, dynamic: bool = True) -> None:
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    example = torch.randn(2 if dynamic else 1, 3, size, size)
    torch.onnx.export(
        module, (example,), str(path), input_names=["input"], output_names=["logits"], dynamic_axes=axes, dynamo=False
    )


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    module = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # seeded and not degenerate: every class gets a different score
        torch.manual_seed(0)
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.05 + (parameter if parameter.dim() == 1 else 0))
    path = tmp_path_factory.mktemp("onnx") / "resnet18.onnx"
    export(module, RESNET_SIZE, path)
    spec = ModelSpec(name="resnet-onnx", kind="onnx", weights=path)
    return module, path, load_model(spec, torch.device("cpu"), warmup=False)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    torch.manual_seed(1)
    module = timm.create_model("vit_tiny_patch16_224", img_size=VIT_SIZE, num_classes=5).eval()
    torch.nn.init.normal_(module.head.weight, std=0.5)
    path = tmp_path_factory.mktemp("onnx") / "vit.onnx"
    export(module, VIT_SIZE, path)
    return module, load_model(ModelSpec(name="vit-onnx", kind="onnx", weights=path), torch.device("cpu"), warmup=False)


def images(size: int, count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(size))


async def test_predictions_over_http_equal_onnx_runtime_run_directly_on_the_file(resnet, cat_jpeg):
    _, path, served = resnet
    x = preprocess([decode_image(cat_jpeg).pixels], served.input_size, served.mean, served.std)
    logits = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0][0]
    want = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    async with running_app(ModelRegistry([served], "resnet-onnx")) as (client, _app):
        response = await client.post("/predict?top_k=10", content=cat_jpeg, headers=JPEG)
    assert response.status_code == 200, response.text
    predictions = response.json()["results"][0]["predictions"]
    got = np.zeros(10)
    for p in predictions:
        got[p["index"]] = p["score"]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [p["index"] for p in predictions] == list(np.argsort(-want, kind="stable"))


def test_the_default_layer_is_the_last_feature_map_before_pooling_and_layers_are_graph_tensors(resnet):
    _, _, served = resnet
    trace = served.engine.trace()
    assert served.default_layer == "/layer4/layer4.1/relu_1/Relu_output_0"
    assert trace.shapes[served.default_layer] == (2, 512, 3, 3) and trace.modules[served.default_layer] == "Relu"
    assert served.methods == ("scorecam", "ablationcam", "eigencam", "rise", "reciprocam")
    assert served.runtime.summary == f"batch 1-{served.runtime.buckets[0].largest}: onnxruntime"


@pytest.mark.parametrize("method", ["eigencam", "ablationcam", "scorecam", "reciprocam"])
def test_cnn_maps_equal_the_same_method_on_the_pytorch_model_at_the_same_layer(resnet, method):
    module, _, served = resnet
    x = images(RESNET_SIZE)
    got = served.engine.explain(x, [[3, 7], [1]], method=method)
    want = CamEngine(module).explain(x, [[3, 7], [1]], method=method, layers="layer4")
    assert got.pairs == want.pairs
    assert want.maps.abs().amax() > 0
    torch.testing.assert_close(got.maps, want.maps, atol=2e-4 * float(want.maps.abs().amax()), rtol=1e-3)


def test_vit_token_maps_equal_the_pytorch_model_through_a_cut_that_carries_the_residual(vit):
    module, served = vit
    assert served.default_layer == "/blocks/blocks.11/norm1/LayerNormalization_output_0"
    cut = served.engine.cut(served.default_layer, images(VIT_SIZE))
    assert cut.kinds == ("rows",)  # the residual stream around the last attention
    x = images(VIT_SIZE)
    reference = CamEngine(module)
    for method in ("eigencam", "ablationcam", "reciprocam"):
        got = served.engine.explain(x, method=method)
        want = reference.explain(x, method=method, layers="blocks.11.norm1")
        assert got.maps.shape == (2, 4, 4) and want.maps.abs().amax() > 0
        torch.testing.assert_close(got.maps, want.maps, atol=2e-4 * float(want.maps.abs().amax()), rtol=1e-3)


def test_a_graph_with_a_fixed_batch_of_one_serves_batches_of_any_size(resnet, tmp_path):
    module, _, _ = resnet
    export(module, RESNET_SIZE, tmp_path / "fixed.onnx", dynamic=False)
    served = load_model(ModelSpec(name="fixed", kind="onnx", weights=tmp_path / "fixed.onnx"), torch.device("cpu"))
    x = images(RESNET_SIZE, 3)
    torch.testing.assert_close(served.engine.predict(x), module(x).detach(), atol=1e-4, rtol=1e-4)
    got = served.engine.explain(x, method="ablationcam")
    want = CamEngine(module).explain(x, method="ablationcam", layers="layer4")
    torch.testing.assert_close(got.maps, want.maps, atol=2e-4 * float(want.maps.abs().amax()), rtol=1e-3)


async def test_gradient_methods_get_a_422_naming_the_methods_that_work_on_every_protocol(resnet, cat_jpeg):
    _, _, served = resnet
    data = base64.b64encode(cat_jpeg).decode()
    async with running_app(ModelRegistry([served], "resnet-onnx")) as (client, _app):
        own = await client.post("/explain?method=gradcampp", content=cat_jpeg, headers=JPEG)
        v1 = await client.post(
            "/v1/models/resnet-onnx:explain", json={"instances": [{"image": {"b64": data}}], "method": "gradcam"}
        )
        v2 = await client.post(
            "/v2/models/resnet-onnx/infer",
            json={
                "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [data]}],
                "parameters": {"method": "layercam"},
            },
        )
        eigen = await client.post("/explain?method=eigencam", content=cat_jpeg, headers=JPEG)
        layers = (await client.get("/models/resnet-onnx/layers")).json()
        metadata = (await client.get("/v2/models/resnet-onnx")).json()
    assert metadata["platform"] == "onnxruntime_onnx"
    for response, method in ((own, "gradcampp"), (v1, "gradcam"), (v2, "layercam")):
        assert response.status_code == 422, response.text
        body = response.json()
        detail = body.get("detail") or body.get("error")
        assert f"{method} (a gradient method)" in detail
        assert "explains with: scorecam, ablationcam, eigencam, rise, reciprocam" in detail
    assert eigen.status_code == 200 and eigen.json()["layers"] == ["/layer4/layer4.1/relu_1/Relu_output_0"]
    heatmap = Image.open(io.BytesIO(base64.b64decode(eigen.json()["results"][0]["explanations"][0]["heatmap"])))
    assert heatmap.size[0] > 0
    named = {layer["name"]: layer for layer in layers["layers"]}
    assert layers["default_layer"] == "/layer4/layer4.1/relu_1/Relu_output_0"
    assert named["/layer4/layer4.1/relu_1/Relu_output_0"]["shape"] == [512, 3, 3]
    assert named["/layer4/layer4.1/relu_1/Relu_output_0"]["module"] == "Relu"


def test_bad_onnx_configuration_stops_start_up_naming_the_model(resnet, tmp_path):
    _, path, _ = resnet
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(ModelConfigError, match="model 'junk': .*junk.onnx is not a readable ONNX model"):
        load_model(ModelSpec(name="junk", kind="onnx", weights=tmp_path / "junk.onnx"), torch.device("cpu"))

    tokens = onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", 16])
    logits = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 16])
    cast = onnx.helper.make_node("Cast", ["ids"], ["logits"], to=onnx.TensorProto.FLOAT)
    text = onnx.helper.make_model(onnx.helper.make_graph([cast], "text", [tokens], [logits]))
    onnx.save(text, tmp_path / "text.onnx")
    with pytest.raises(ModelConfigError, match=r"model 'text': input 'ids' is INT64 \['\?', 16\]; an image input is"):
        load_model(ModelSpec(name="text", kind="onnx", weights=tmp_path / "text.onnx"), torch.device("cpu"))

    with pytest.raises(ModelConfigError, match="model 'r': default_layer: unknown tensor 'layer4'"):
        load_model(ModelSpec(name="r", kind="onnx", weights=path, default_layer="layer4"), torch.device("cpu"))
    with pytest.raises(ModelConfigError, match=r"model 'r': input_size \[128, 128\] contradicts .* \[96, 96\]"):
        load_model(ModelSpec(name="r", kind="onnx", weights=path, input_size=(128, 128)), torch.device("cpu"))
    single = tmp_path / "single.onnx"
    export(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 1)), 8, single)
    with pytest.raises(ModelConfigError, match="model 'r': head = 'softmax' contradicts the model"):
        load_model(ModelSpec(name="r", kind="onnx", weights=single, head="softmax"), torch.device("cpu"))


def test_a_one_channel_graph_gets_one_channel_inputs(tmp_path):
    torch.manual_seed(2)
    module = torchvision.models.resnet18(num_classes=3).eval()
    module.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False).eval()
    torch.onnx.export(
        module, (torch.randn(2, 1, 32, 32),), str(tmp_path / "gray.onnx"), input_names=["input"],
        output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    served = load_model(ModelSpec(name="gray", kind="onnx", weights=tmp_path / "gray.onnx"), torch.device("cpu"))
    assert served.preprocessing.channels == 1 and served.input_size == (32, 32)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(served.engine.predict(x), module(x).detach(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ModelConfigError, match="channels = 3 contradicts the model"):
        load_model(ModelSpec(name="g", kind="onnx", weights=tmp_path / "gray.onnx", channels=3), torch.device("cpu"))


def test_fused_layers_on_an_onnx_model_equal_the_pytorch_models_fusion(resnet):
    module, _, served = resnet
    x = images(RESNET_SIZE)
    tensors = ["/layer3/layer3.1/relu_1/Relu_output_0", served.default_layer]
    got = served.engine.explain(x, method="eigencam", layers=tensors)
    want = CamEngine(module).explain(x, method="eigencam", layers=["layer3", "layer4"])
    assert got.layers == tuple(tensors) and got.maps.shape == want.maps.shape == (2, 6, 6)
    torch.testing.assert_close(got.maps, want.maps, atol=1e-4, rtol=1e-3)
