"""Model sources: torchvision, timm and Hugging Face checkpoints, weight formats, preprocessing, start-up errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from camserve.images import decode_image, preprocess
from camserve.models import ModelConfigError, ModelSpec, read_models_file
from camserve.models.loader import build_model, imagenet_labels
from camserve.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from camserve.models.sources import LogitsOnly
from tests.apphelpers import running_app
from tests.conftest import jpeg_bytes

HALF = (0.5, 0.5, 0.5)
JPEG = {"content-type": "image/jpeg"}


@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    """A state dict as safetensors (by suffix) or as a torch pickle."""
    if path.suffix == ".safetensors":
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def randomized(model: nn.Module) -> nn.Module:
    """Seeded model whose every float tensor (biases and BatchNorm statistics too) is moved off its init value."""
    torch.manual_seed(1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.rand_like(tensor))
    return model.eval()


def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return module.eval()(x)


def hf_vit(transformers, num_labels: int = 5, image_size: int = 224):
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=image_size,
        patch_size=16,
        num_labels=num_labels,
        id2label={i: f"hf{i}" for i in range(num_labels)},
        label2id={f"hf{i}": i for i in range(num_labels)},
    )
    return transformers.ViTForImageClassification(config).eval()


def save_hf(transformers, folder: Path, model: nn.Module, processor: bool = True) -> Path:
    model.save_pretrained(folder)
    if processor:
        transformers.ViTImageProcessor(
            size={"height": 224, "width": 224}, image_mean=HALF, image_std=HALF, resample=Image.Resampling.BICUBIC
        ).save_pretrained(folder)
    return folder


# -- weight formats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "architecture", "suffix"),
    [
        ("timm", "resnet10t", ".safetensors"),
        ("timm", "resnet10t", ".pth"),
        ("timm", "resnet10t", ".bin"),
        ("torchvision", "shufflenet_v2_x0_5", ".safetensors"),
        ("torchvision", "shufflenet_v2_x0_5", ".pth"),
        ("entrypoint", None, ".safetensors"),
    ],
)
def test_every_weights_format_gives_the_saved_models_logits(tmp_path, timm, kind, architecture, suffix):
    from tests.fixtures.tiny_models import tiny_classifier

    torch.manual_seed(0)
    if kind == "timm":
        reference = timm.create_model(architecture, pretrained=False, num_classes=5)
    elif kind == "torchvision":
        reference = torchvision.models.get_model(architecture, num_classes=5)
    else:
        reference = tiny_classifier()
    reference = randomized(reference)
    weights = save(reference.state_dict(), tmp_path / f"w{suffix}")
    source = {"entrypoint": "tests.fixtures.tiny_models:tiny_classifier"} if kind == "entrypoint" else {}
    source.update({"architecture": architecture} if architecture else {})
    built = build_model(ModelSpec(name="m", kind=kind, weights=weights, **source))
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(forward(built.module, x), forward(reference, x), rtol=0, atol=0)


# -- torchvision: every family, class count from the weights ----------------------------------------------

# One small representative per family: the input side and filter of its default torchvision weights, and whether
# the architecture only takes that input size (then one forward at it is checked; convolutional networks take any
# size, and a forward of efficientnet_v2_s at 384 costs seconds on two cores).
FAMILIES = {
    "vit_b_16": (224, "bilinear", True),
    "swin_t": (224, "bicubic", True),
    "swin_v2_t": (256, "bicubic", True),
    "maxvit_t": (224, "bicubic", True),
    "convnext_tiny": (224, "bilinear", False),
    "efficientnet_v2_s": (384, "bilinear", False),
    "regnet_y_400mf": (224, "bilinear", False),
    "mobilenet_v3_small": (224, "bilinear", False),
    "mnasnet0_5": (224, "bilinear", False),  # reads a module version while loading (absent from safetensors)
}


@pytest.mark.slow  # about 30 s on two idle cores: the transformer families take seconds to initialise
@pytest.mark.parametrize("architecture", list(FAMILIES))
def test_torchvision_families_load_from_safetensors_with_the_class_count_of_the_weights(tmp_path, architecture):
    torch.manual_seed(0)
    reference = torchvision.models.get_model(architecture, num_classes=7)
    weights = save(reference.state_dict(), tmp_path / "w.safetensors")
    built = build_model(ModelSpec(name="tv", kind="torchvision", architecture=architecture, weights=weights))
    side, interpolation, fixed_size = FAMILIES[architecture]
    assert built.preprocessing == Preprocessing((side, side), IMAGENET_MEAN, IMAGENET_STD, interpolation)
    assert built.labels is None and built.architecture == architecture
    loaded = built.module.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())
    if fixed_size:
        assert forward(built.module, torch.rand(1, 3, side, side)).shape == (1, 7)


def test_torchvision_1000_classes_get_imagenet_labels_and_num_classes_must_agree(tmp_path):
    weights = save(torchvision.models.squeezenet1_0().state_dict(), tmp_path / "w.pth")
    spec = ModelSpec(name="sq", kind="torchvision", architecture="squeezenet1_0", weights=weights)
    built = build_model(spec)  # a convolution as its head: the class count is still found
    assert built.labels == imagenet_labels() and forward(built.module, torch.rand(1, 3, 64, 64)).shape == (1, 1000)
    wrong = ModelSpec(name="sq", kind="torchvision", architecture="squeezenet1_0", weights=weights, num_classes=10)
    with pytest.raises(
        ModelConfigError, match=r"model 'sq': weights do not fit architecture squeezenet1_0.*mis-shaped"
    ):
        build_model(wrong)


# -- timm -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "expected"),
    [
        ("vit_tiny_patch16_224", Preprocessing((224, 224), HALF, HALF, "bicubic")),
        ("deit_tiny_distilled_patch16_224", Preprocessing((224, 224), IMAGENET_MEAN, IMAGENET_STD, "bicubic")),
        ("resnet10t", Preprocessing((176, 176), IMAGENET_MEAN, IMAGENET_STD, "bicubic")),
    ],
)
def test_timm_preprocessing_comes_from_its_pretrained_config(tmp_path, timm, architecture, expected):
    torch.manual_seed(0)
    reference = randomized(timm.create_model(architecture, pretrained=False, num_classes=3))
    weights = save(reference.state_dict(), tmp_path / "w.safetensors")
    built = build_model(ModelSpec(name="t", kind="timm", architecture=architecture, weights=weights))
    assert built.preprocessing == expected and built.labels is None
    x = torch.rand(1, 3, *expected.input_size)
    torch.testing.assert_close(forward(built.module, x), forward(reference, x), rtol=0, atol=0)


def test_timm_preprocessing_is_overridden_by_the_models_file_and_labels_follow_the_class_count(tmp_path, timm):
    torch.manual_seed(0)
    save(timm.create_model("resnet10t", pretrained=False).state_dict(), tmp_path / "in1k.safetensors")
    save(timm.create_model("resnet10t", pretrained=False, num_classes=3).state_dict(), tmp_path / "three.bin")
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n")
    (tmp_path / "models.toml").write_text(
        """
[[models]]
name = "in1k"
kind = "timm"
architecture = "resnet10t"
weights = "in1k.safetensors"
input_size = [160, 192]
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]
interpolation = "bilinear"

[[models]]
name = "three"
kind = "timm"
architecture = "resnet10t"
weights = "three.bin"
labels = "labels.txt"
"""
    )
    in1k, three = (build_model(spec) for spec in read_models_file(tmp_path / "models.toml").models)
    assert in1k.preprocessing == Preprocessing((160, 192), HALF, (0.25, 0.25, 0.25), "bilinear")
    assert in1k.labels == imagenet_labels()
    assert three.preprocessing == Preprocessing((176, 176), IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    assert three.labels == ["cat", "dog", "bird"]


# -- Hugging Face -----------------------------------------------------------------------------------------


def test_huggingface_folder_gives_logits_labels_and_processor_preprocessing(tmp_path, transformers):
    reference = hf_vit(transformers)
    folder = save_hf(transformers, tmp_path / "vit", reference)
    built = build_model(ModelSpec(name="hf", kind="huggingface", path=folder))
    assert built.preprocessing == Preprocessing((224, 224), HALF, HALF, "bicubic")
    assert built.labels == [f"hf{i}" for i in range(5)] and built.architecture == "ViTForImageClassification"
    assert isinstance(built.module, LogitsOnly)
    names = dict(built.module.named_modules())
    assert type(names["hf"]) is type(reference) and isinstance(names["hf.classifier"], nn.Linear)
    x = torch.rand(2, 3, 224, 224)
    logits = forward(built.module, x)
    with torch.inference_mode():
        expected = reference(pixel_values=x).logits
    assert isinstance(logits, torch.Tensor)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_huggingface_without_processor_config_uses_image_size_and_imagenet_statistics(tmp_path, transformers):
    folder = save_hf(transformers, tmp_path / "vit", hf_vit(transformers, image_size=64), processor=False)
    built = build_model(ModelSpec(name="hf", kind="huggingface", path=folder, interpolation="bicubic"))
    assert built.preprocessing == Preprocessing((64, 64), IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    assert forward(built.module, torch.rand(1, 3, 64, 64)).shape == (1, 5)


def test_a_filter_the_service_does_not_implement_must_be_overridden(tmp_path, transformers):
    folder = save_hf(transformers, tmp_path / "vit", hf_vit(transformers), processor=False)
    transformers.ViTImageProcessor(resample=Image.Resampling.LANCZOS).save_pretrained(folder)
    with pytest.raises(ModelConfigError, match=r"model 'lz': .*'lanczos' resampling.*set `interpolation`"):
        build_model(ModelSpec(name="lz", kind="huggingface", path=folder))
    built = build_model(ModelSpec(name="lz", kind="huggingface", path=folder, interpolation="bicubic"))
    assert built.preprocessing.interpolation == "bicubic"


# -- bad configuration: refused at start-up, naming the model and the problem --------------------------------


def test_a_timm_name_with_a_typo_suggests_close_names(tmp_path, timm):
    spec = ModelSpec(name="typo", kind="timm", architecture="vit_tiny_pach16_224", weights=tmp_path / "w.pth")
    with pytest.raises(ModelConfigError) as error:
        build_model(spec)
    assert "model 'typo'" in str(error.value) and "'vit_tiny_pach16_224' is not a timm model" in str(error.value)
    assert "did you mean vit_tiny_patch16_224" in str(error.value)


def test_weights_that_do_not_fit_are_refused(tmp_path, timm):
    state = timm.create_model("resnet10t", pretrained=False, num_classes=3).state_dict()
    other = save(state, tmp_path / "resnet10t.safetensors")
    spec = ModelSpec(name="wrong-arch", kind="timm", architecture="resnet18", weights=other)
    with pytest.raises(ModelConfigError, match=r"model 'wrong-arch': weights do not fit architecture resnet18.*key"):
        build_model(spec)
    state.pop("layer1.0.conv1.weight")
    partial = save(state, tmp_path / "partial.pth")
    spec = ModelSpec(name="partial", kind="timm", architecture="resnet10t", weights=partial)
    with pytest.raises(ModelConfigError, match=r"model 'partial': weights do not fit .*missing key.*layer1.0.conv1"):
        build_model(spec)


def test_a_corrupt_safetensors_file_is_refused(tmp_path, timm):
    good = save(timm.create_model("resnet10t", pretrained=False).state_dict(), tmp_path / "good.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    for name in ("cut", "junk"):
        spec = ModelSpec(name=name, kind="timm", architecture="resnet10t", weights=tmp_path / f"{name}.safetensors")
        with pytest.raises(ModelConfigError, match=rf"model '{name}': .*{name}.safetensors is not a valid safetensors"):
            build_model(spec)


def test_huggingface_folders_that_do_not_fit_are_refused(tmp_path, transformers):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelConfigError, match=r"model 'nocfg': .*empty is not a Hugging Face model folder"):
        build_model(ModelSpec(name="nocfg", kind="huggingface", path=empty))
    folder = save_hf(transformers, tmp_path / "vit", hf_vit(transformers))
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    state.pop("classifier.weight")  # from_pretrained would silently re-initialise it
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ModelConfigError) as error:
        build_model(ModelSpec(name="refit", kind="huggingface", path=folder))
    message = str(error.value)
    assert message.startswith("model 'refit': weights in ") and "do not fit ViTForImageClassification" in message
    assert "1 missing key: classifier.weight" in message and "1 unexpected key: extra.weight" in message

    head = save_hf(transformers, tmp_path / "head", hf_vit(transformers, num_labels=3))
    config = json.loads((head / "config.json").read_text())
    config["id2label"] = {str(i): f"hf{i}" for i in range(5)}  # 5 labels, a head of 3 rows
    config["label2id"] = {f"hf{i}": i for i in range(5)}
    (head / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError) as error:
        build_model(ModelSpec(name="head", kind="huggingface", path=head))
    assert "2 mismatched keys: classifier.bias (3,) (the model has (5,)), classifier.weight (3, 64)" in str(error.value)


def test_weight_files_that_are_empty_or_folders_and_long_key_lists_read_well(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "folder.pth").mkdir()
    for weights, message in [("empty.pth", r"empty.pth is empty \(0 bytes\)"), ("folder.pth", "is a directory")]:
        spec = ModelSpec(name="r", kind="torchvision", architecture="resnet18", weights=tmp_path / weights)
        with pytest.raises(ModelConfigError, match=rf"model 'r': .*{message}"):
            build_model(spec)
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("layer4")}
    spec = ModelSpec(name="r", kind="torchvision", architecture="resnet18", weights=save(state, tmp_path / "w.pth"))
    with pytest.raises(ModelConfigError) as error:
        build_model(spec)
    message = str(error.value)
    assert "30 missing keys: layer4.0.conv1.weight, " in message and " and 25 more" in message
    assert len(message) < 400 and "\n" not in message


def test_a_torchvision_typo_gets_close_names(tmp_path):
    weights = save(torchvision.models.resnet18().state_dict(), tmp_path / "w.pth")
    with pytest.raises(ModelConfigError, match=r"'resnet-18' is not a torchvision classification model; did you mean "):
        build_model(ModelSpec(name="r", kind="torchvision", architecture="resnet-18", weights=weights))


@pytest.mark.parametrize(("module", "kind", "extra"), [("timm", "timm", "timm"), ("transformers", "huggingface", "hf")])
def test_a_missing_extra_is_named(tmp_path, monkeypatch, module, kind, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    fields = {"path": tmp_path} if kind == "huggingface" else {"architecture": "resnet10t", "weights": tmp_path}
    with pytest.raises(ModelConfigError, match=rf"model 'x': .*pip install 'camserve\[{extra}\]'"):
        build_model(ModelSpec(name="x", kind=kind, **fields))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('kind = "timm"\narchitecture = "resnet10t"', "model 'x' field weights: Field required"),
        ('kind = "huggingface"', "model 'x': .*needs `path`"),
        ('kind = "timm"\narchitecture = "a"\nweights = "w"\nentrypoint = "m:f"', "model 'x' field entrypoint: Extra"),
        ('kind = "tensorrt"', "model 'x' field kind: .*'tensorrt'"),
        ('kind = "onnx"', "model 'x': an onnx model needs `weights`"),
        ('kind = "onnx"\nweights = "m.onnx"\nruntime = "eager"', "model 'x': an onnx model runs on ONNX Runtime"),
        ('kind = "exported"', "model 'x': an exported model needs `weights`"),
        ('interpolation = "nearest"', "model 'x' field interpolation"),
        (
            'architecture = "efficientnet-lite0"\ninput_size = [9000, 9000]',
            "model 'x': input_size values must be from 1 to 4096",
        ),
        ('kind = "torchscript"\nweights = "m.pt"\ndefault_layer = "layer4"', "torchscript .* default_layer cannot"),
        ('kind = "torchscript"\nweights = "m.pt"\nruntime = "auto"', "torchscript .* so runtime cannot apply"),
        ('architecture = "efficientnet-lite0"\ncompile = "off"', "model 'x': `compile` was replaced by `runtime`"),
        (
            'architecture = "efficientnet-lite0"\ndefault = true\n'
            '[[models]]\nname = "y"\narchitecture = "efficientnet-lite0"',
            "^models file .* is invalid: default = 'y' contradicts model 'x'",
        ),
    ],
)
def test_models_file_entries_of_the_new_kinds_are_validated(tmp_path, entry, message):
    path = tmp_path / "models.toml"
    top = 'default = "y"\n' if "contradicts" in message else ""
    path.write_text(f'{top}[[models]]\nname = "x"\n{entry}\n')
    with pytest.raises(ModelConfigError, match=message):
        read_models_file(path)


# -- HTTP -------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_timm_and_huggingface_models_predict_and_explain_beside_the_default(
    tmp_path, timm, transformers, chelsea, cat_jpeg
):
    torch.manual_seed(0)
    save(randomized(timm.create_model("vit_tiny_patch16_224", num_classes=4)).state_dict(), tmp_path / "vit.pth")
    save_hf(transformers, tmp_path / "hf-vit", hf_vit(transformers))
    (tmp_path / "models.toml").write_text(
        """
default = "efficientnet-lite0"
[[models]]
name = "efficientnet-lite0"

[[models]]
name = "timm-vit"
kind = "timm"
architecture = "vit_tiny_patch16_224"
weights = "vit.pth"

[[models]]
name = "hf-vit"
kind = "huggingface"
path = "hf-vit"
"""
    )
    big = np.asarray(Image.fromarray(chelsea).resize((1500, 1000), Image.Resampling.BILINEAR))  # resized by PIL
    photos = {"small": cat_jpeg, "big": jpeg_bytes(big)}
    async with running_app(None, models_file=tmp_path / "models.toml", warmup=False) as (client, app):
        assert app.state.lifecycle.error is None and app.state.lifecycle.is_ready
        listed = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
        answers = {
            (model, photo): (await client.post(f"/predict?model={model}&top_k=5", content=data, headers=JPEG)).json()
            for model in ("timm-vit", "hf-vit")
            for photo, data in photos.items()
        }
        explained = {
            model: (
                await client.post(
                    f"/explain?model={model}&method=gradcam&raw=true", content=photos["small"], headers=JPEG
                )
            ).json()
            for model in ("timm-vit", "hf-vit")
        }
        layers = (await client.get("/models/timm-vit/layers")).json()
        fused = await client.post(
            "/explain?model=timm-vit&layer=patch_embed.proj&layer=blocks.11.norm1&counterfactual=true&target=2",
            content=photos["small"],
            headers=JPEG,
        )
        guided = await client.post("/explain?model=hf-vit&method=guided-gradcam", content=photos["small"], headers=JPEG)
        registry = app.state.service.registry
    assert listed["efficientnet-lite0"]["default"] and listed["efficientnet-lite0"]["interpolation"] == "bilinear"
    for name in ("timm-vit", "hf-vit"):
        assert listed[name]["input_size"] == [224, 224] and listed[name]["interpolation"] == "bicubic"
        assert listed[name]["mean"] == [0.5, 0.5, 0.5] and listed[name]["std"] == [0.5, 0.5, 0.5]
    for (name, photo), body in answers.items():
        served = registry.get(name)
        pixels = decode_image(photos[photo]).pixels
        x = preprocess([pixels], served.input_size, served.mean, served.std, interpolation="bicubic")
        expected = torch.softmax(forward(served.module, x), dim=1)[0]
        assert "results" in body, body
        predictions = body["results"][0]["predictions"]
        assert len(predictions) == len(served.labels) == (4 if name == "timm-vit" else 5)
        got = torch.tensor([p["score"] for p in sorted(predictions, key=lambda p: p["index"])])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        assert predictions[0]["label"] == served.labels[int(expected.argmax())]
    assert listed["timm-vit"]["default_layer"] == "blocks.11.norm1"
    assert listed["hf-vit"]["default_layer"] == "hf.vit.layers.1.layernorm_before"
    for name, body in explained.items():
        served = registry.get(name)
        x = preprocess([decode_image(photos["small"]).pixels], served.input_size, served.mean, served.std, "cpu",
                       interpolation="bicubic")  # fmt: skip
        expected = served.engine.explain(x, method="gradcam").maps[0]
        assert body["layers"] == [served.default_layer]
        cam = torch.tensor(body["results"][0]["explanations"][0]["cam"])
        assert cam.shape == (14, 14) and cam.max() > 0
        torch.testing.assert_close(cam, expected, rtol=1e-4, atol=1e-6)
    norm1 = next(layer for layer in layers["layers"] if layer["name"] == "blocks.11.norm1")
    assert norm1 | {"module": ""} == {
        "name": "blocks.11.norm1", "module": "", "shape": [197, 192], "spatial": True, "layout": "tokens",
        "grid": [14, 14], "prefix_tokens": 1,
    }  # fmt: skip
    assert fused.status_code == 200 and fused.json()["layers"] == ["patch_embed.proj", "blocks.11.norm1"]
    assert fused.json()["results"][0]["explanations"][0]["index"] == 2
    assert guided.status_code == 200, guided.text


def test_weights_that_torch_itself_loads_are_accepted():
    """A 1-element num_batches_tracked from an old checkpoint, and a lazy module's uninitialised parameters."""
    from camserve.models.weights import load_into

    old = torchvision.models.resnet18().state_dict()
    old["bn1.num_batches_tracked"] = torch.tensor([7])
    model = torchvision.models.resnet18()
    load_into(model, old, "resnet18")
    assert model.bn1.num_batches_tracked.item() == 7
    lazy = nn.Sequential(nn.LazyLinear(3))
    weights = nn.Sequential(nn.Linear(5, 3)).state_dict()
    load_into(lazy, weights, "lazy")
    assert torch.equal(lazy[0].weight, weights["0.weight"])
