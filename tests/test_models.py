"""Model configuration and loading: the embedded default, torchvision, TorchScript, entry points."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torchvision

from camserve.errors import InvalidParameterError, UnknownModelError
from camserve.images import decode_image, preprocess
from camserve.models import ModelConfigError, ModelRegistry, ModelSpec, load_model, read_models_file, resolve_device
from tests.conftest import jpeg_bytes

CAT_CLASSES = {"Egyptian cat", "tabby", "tiger cat", "Persian cat", "Siamese cat"}


def top1(model, photo) -> tuple[str, float]:
    pixels = decode_image(jpeg_bytes(photo)).pixels
    x = preprocess([pixels], model.input_size, model.mean, model.std, model.device)
    probabilities = torch.softmax(model.engine.predict(x), dim=1)[0]
    score, index = probabilities.max(dim=0)
    return model.labels[int(index)], float(score)


def test_embedded_default_classifies_real_photos(registry, chelsea, coffee):
    model = registry.get()
    assert model.name == "efficientnet-lite0" and registry.default_name == model.name
    label, score = top1(model, chelsea)
    assert label == "Egyptian cat" and 0.6 < score < 0.95
    label, _ = top1(model, coffee)
    assert label in {"espresso", "cup", "coffee mug"}
    assert all(not p.requires_grad for p in model.module.parameters())
    assert not model.module.training


@pytest.mark.parametrize(("name", "side"), [("efficientnet-lite1", 240), ("efficientnet-lite2", 260)])
def test_lite1_and_lite2_by_name(name, side, chelsea):
    model = load_model(ModelSpec(name=name), torch.device("cpu"), warmup=False)
    assert model.input_size == (side, side)
    label, _ = top1(model, chelsea)
    assert label in CAT_CLASSES


def test_torchvision_state_dict_from_models_file(tmp_path, cat_jpeg):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=3).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet.pth")
    (tmp_path / "labels.json").write_text(json.dumps(["alpha", "beta", "gamma"]))
    (tmp_path / "models.toml").write_text(
        """
default = "res"
[[models]]
name = "lite"
architecture = "efficientnet-lite0"
[[models]]
name = "res"
kind = "torchvision"
architecture = "resnet18"
weights = "resnet.pth"
labels = "labels.json"
input_size = [128, 160]
"""
    )
    registry = ModelRegistry.load(tmp_path / "models.toml", "cpu", warmup=True)
    assert [m.name for m in registry] == ["lite", "res"] and registry.default_name == "res"
    res = registry.get()
    assert res.labels == ["alpha", "beta", "gamma"] and res.default_layer == "layer4"
    assert res.input_size == (128, 160) and res.mean == (0.485, 0.456, 0.406)
    x = preprocess([decode_image(cat_jpeg).pixels], res.input_size, res.mean, res.std)
    with torch.inference_mode():
        expected = reference(x)
    torch.testing.assert_close(res.engine.predict(x), expected)
    assert res.class_index("beta") == 1 and res.class_index(2) == 2 and res.class_index("0") == 0
    with pytest.raises(InvalidParameterError, match="out of range"):
        res.class_index(3)
    with pytest.raises(InvalidParameterError, match="unknown label 'delta'"):
        res.class_index("delta")
    with pytest.raises(UnknownModelError, match="served models: lite, res"):
        registry.get("nope")


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    model = torchvision.models.resnet18(num_classes=3)
    torch.save(model, tmp_path / "whole_model.pth")  # a pickled module object, not a state dict
    spec = ModelSpec(name="evil", kind="torchvision", architecture="resnet18", weights=tmp_path / "whole_model.pth")
    with pytest.raises(ModelConfigError, match="'evil'.*not a plain state dict"):
        load_model(spec, torch.device("cpu"))

    class Payload:
        def __reduce__(self):
            return (print, ("arbitrary code ran",))

    (tmp_path / "payload.pth").write_bytes(pickle.dumps({"fc.weight": Payload()}))
    spec = ModelSpec(name="evil2", kind="torchvision", architecture="resnet18", weights=tmp_path / "payload.pth")
    with pytest.raises(ModelConfigError, match="evil2"):
        load_model(spec, torch.device("cpu"))


def test_torchscript_and_entrypoint_models(tmp_path):
    from tests.fixtures.tiny_models import tiny_classifier

    scripted = torch.jit.script(tiny_classifier().eval())
    scripted.save(str(tmp_path / "tiny.pt"))
    (tmp_path / "labels.txt").write_text("a\nb\nc\nd\n")
    ts = load_model(
        ModelSpec(name="ts", kind="torchscript", weights=tmp_path / "tiny.pt", input_size=(32, 32)),
        torch.device("cpu"),
    )
    assert ts.num_classes == 4 and ts.labels == ["0", "1", "2", "3"]
    assert ts.methods == ("rise",) and ts.default_layer is None
    assert ts.engine.predict(torch.rand(1, 3, 32, 32)).shape == (1, 4)
    ep = load_model(
        ModelSpec(
            name="ep",
            kind="entrypoint",
            entrypoint="tests.fixtures.tiny_models:tiny_classifier",
            labels=tmp_path / "labels.txt",
            input_size=(32, 32),
        ),
        torch.device("cpu"),
    )
    assert ep.labels == ["a", "b", "c", "d"] and ep.default_layer == "1"
    result = ep.engine.explain(torch.rand(2, 3, 32, 32), method="gradcam")
    assert result.maps.shape == (2, 32, 32)
    with pytest.raises(ModelConfigError, match="returned str, not an nn.Module"):
        load_model(
            ModelSpec(name="bad", kind="entrypoint", entrypoint="tests.fixtures.tiny_models:not_a_module"),
            torch.device("cpu"),
        )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[[models]\nname=", "cannot be read"),
        (
            '[[models]]\nname = "x"\nkind = "torchvision"\narchitecture = "resnet18"',
            "model 'x'.*needs `architecture` and `weights`",
        ),
        (
            '[[models]]\nname = "x"\nkind = "builtin"\narchitecture = "efficientnet-b7"',
            "model 'x'.*builtin architecture",
        ),
        (
            '[[models]]\nname = "efficientnet-lite0"\n[[models]]\nname = "efficientnet-lite0"',
            "repeated: efficientnet-lite0",
        ),
        ('default = "zzz"\n[[models]]\nname = "efficientnet-lite0"', "default model 'zzz'"),
        ('[[models]]\nname = "x"\ncolour = "red"', "model 'x' field colour"),
    ],
)
def test_broken_models_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "models.toml"
    path.write_text(content)
    with pytest.raises(ModelConfigError, match=message):
        read_models_file(path)


def test_missing_weights_and_files_fail_at_start_up(tmp_path):
    with pytest.raises(ModelConfigError, match="does not exist"):
        read_models_file(tmp_path / "absent.toml")
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nname = "res"\nkind = "torchvision"\narchitecture = "resnet18"\nweights = "nope.pth"\n')
    with pytest.raises(ModelConfigError, match=r"model 'res': weights file .*nope.pth does not exist"):
        ModelRegistry.load(path, "cpu")
    path.write_text('[[models]]\nname = "res"\nkind = "torchvision"\narchitecture = "resnet999"\nweights = "x.pth"\n')
    (tmp_path / "x.pth").write_bytes(b"")
    with pytest.raises(ModelConfigError, match="'resnet999' is not a torchvision classification model"):
        ModelRegistry.load(path, "cpu")


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ("3", r"model 'ep': default_layer: layer '3' outputs \[8\] per image"),
        ("nope", "model 'ep': default_layer: unknown layer 'nope'"),
    ],
)
def test_a_default_layer_that_cannot_explain_stops_start_up(layer, message):
    spec = ModelSpec(
        name="ep",
        kind="entrypoint",
        entrypoint="tests.fixtures.tiny_models:tiny_classifier",
        input_size=(32, 32),
        default_layer=layer,
    )
    with pytest.raises(ModelConfigError, match=message):
        load_model(spec, torch.device("cpu"), warmup=False)


def test_a_model_whose_head_gives_no_gradient_is_served_with_a_warning(tmp_path, caplog):
    model = torchvision.models.resnet18(num_classes=3)
    torch.nn.init.zeros_(model.fc.weight)  # as torchvision initialises its ViT heads
    torch.save(model.state_dict(), tmp_path / "r.pth")
    spec = ModelSpec(name="zero", kind="torchvision", architecture="resnet18", weights=tmp_path / "r.pth")
    with caplog.at_level("WARNING", logger="camserve.models.registry"):
        served = load_model(spec, torch.device("cpu"), warmup=False)
    assert served.default_layer == "layer4"
    assert "model zero: no layer's gradient reaches its grid" in caplog.text and "layer4" in caplog.text


def test_labels_must_match_the_model(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "r.pth")
    (tmp_path / "labels.json").write_text(json.dumps(["only", "two"]))
    spec = ModelSpec(
        name="r",
        kind="torchvision",
        architecture="resnet18",
        weights=tmp_path / "r.pth",
        labels=tmp_path / "labels.json",
    )
    with pytest.raises(ModelConfigError, match="2 labels for a model with 3 outputs"):
        load_model(spec, torch.device("cpu"), warmup=False)


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelConfigError, match="no CUDA device"):
            resolve_device("cuda")
