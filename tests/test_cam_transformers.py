"""Vision transformers and channels-last models: layouts read from the model, maps equal to pytorch-grad-cam.

No package ships trained transformer weights and none can be downloaded here, so every model in this file
has seeded random weights (torchvision's zero-initialised ViT head is re-drawn, or every map is zero).
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from camserve.cam import CamEngine, CamError, UnknownLayerError
from camserve.cam.render import minmax_normalize
from tests.camhelpers import EpsGradCAMPlusPlus, Logits, reference_maps, seeded
from tests.conftest import to_lite_input

IMAGENET_TARGETS = [281, 967]


def tokens_to_nchw(prefix: int, grid: int = 14):
    """pytorch-grad-cam's reshape_transform for a ViT, written out by hand as its users do."""

    def transform(tensor: torch.Tensor) -> torch.Tensor:
        result = tensor[:, prefix:, :].reshape(tensor.size(0), grid, grid, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    return transform


def nhwc_to_nchw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.permute(0, 3, 1, 2)


def build(which: str) -> tuple[nn.Module, str, object, list[int] | None]:
    """(model, layer, pytorch-grad-cam reshape_transform, targets) for each model under test: a fresh copy."""
    model, *rest = _build(which)
    return copy.deepcopy(model), *rest


@functools.cache
def _build(which: str) -> tuple[nn.Module, str, object, list[int] | None]:
    torch.manual_seed(0)
    if which == "tv_vit_b_16":
        return seeded(torchvision.models.vit_b_16()), "encoder.layers.encoder_layer_11.ln_1", tokens_to_nchw(1), None
    if which == "tv_swin_t":
        return seeded(torchvision.models.swin_t()), "features.7.1.norm1", nhwc_to_nchw, None
    if which == "timm_deit_distilled":
        import timm

        model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
        return seeded(model), "blocks.11.norm1", tokens_to_nchw(2), None
    if which == "timm_vit_registers":
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, reg_tokens=4)
        return seeded(model), "blocks.11.norm1", tokens_to_nchw(5), None
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, num_labels=5)
    model = Logits(ViTForImageClassification(config))
    return seeded(model), "model.vit.layers.1.layernorm_before", tokens_to_nchw(1), [1, 3]


MODELS = ["tv_vit_b_16", "tv_swin_t", "timm_deit_distilled", "timm_vit_registers", "hf_vit"]


@pytest.fixture(scope="module")
def photos(chelsea: np.ndarray, coffee: np.ndarray) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = torch.cat([to_lite_input(chelsea), to_lite_input(coffee)]) * 0.5 + 0.5
    return (pixels - mean) / std


@pytest.fixture(scope="module", params=MODELS)
def subject(request):
    model, layer, transform, targets = build(request.param)
    return request.param, model, layer, transform, targets or IMAGENET_TARGETS


@pytest.mark.parametrize("method", ["gradcam", "layercam", "hirescam", "gradcampp"])
def test_maps_equal_pytorch_grad_cam_with_its_reshape_transform(subject, method, photos):
    which, model, layer, transform, targets = subject
    reference = copy.deepcopy(model)
    theirs = reference_maps(
        method, reference, reference.get_submodule(layer), photos, targets=targets, reshape_transform=transform
    )
    ours_method = EpsGradCAMPlusPlus() if method == "gradcampp" else method
    engine = CamEngine(copy.deepcopy(model))
    ours = engine.explain(photos, [[t] for t in targets], method=ours_method, layers=layer)
    mine = minmax_normalize(ours.maps).numpy()
    grid = (7, 7) if which == "tv_swin_t" else (14, 14)
    assert mine.shape == theirs.shape == (2, *grid)
    np.testing.assert_allclose(mine, theirs, atol=1e-4)
    assert mine.max() == pytest.approx(1.0) and not np.allclose(mine[0], mine[1], atol=1e-2)


@pytest.mark.parametrize(
    ("which", "layer", "kind", "prefix"),
    [
        ("tv_vit_b_16", "encoder.layers.encoder_layer_11.ln_1", "tokens", 1),
        ("tv_swin_t", "features.7.1.norm1", "nhwc", 0),
        ("timm_deit_distilled", "blocks.11.norm1", "tokens", 2),
        ("timm_vit_registers", "blocks.11.norm1", "tokens", 5),
        ("hf_vit", "model.vit.layers.1.layernorm_before", "tokens", 1),
    ],
)
def test_layouts_are_read_from_the_traced_forward(which, layer, kind, prefix, photos):
    model, *_ = build(which)
    trace = CamEngine(model).trace(photos)
    layout = trace.layout(layer)
    assert (layout.kind, layout.prefix) == (kind, prefix)
    assert layout.grid == ((7, 7) if which == "tv_swin_t" else (14, 14))


@pytest.mark.parametrize("which", ["tv_vit_b_16", "timm_deit_distilled", "timm_vit_registers", "hf_vit"])
def test_vit_default_layer_is_the_last_blocks_input_norm_and_explains(which, photos):
    """The last block's output gives the patch tokens no gradient (the head reads only prefix tokens)."""
    model, expected, *_ = build(which)
    engine = CamEngine(model)
    assert engine.trace(photos).default_layer == expected
    assert engine.explain(photos).maps.amax(dim=(1, 2)).min() > 0
    last_block = expected.rsplit(".", 1)[0]
    assert engine.explain(photos, layers=last_block).maps.abs().max() == 0


@pytest.mark.parametrize(
    ("name", "expected"),
    [("swin_t", "permute"), ("convnext_tiny", "features"), ("resnet18", "layer4")],
)
def test_cnn_like_default_layers_are_the_last_feature_map(name, expected, photos):
    torch.manual_seed(0)
    model = seeded(torchvision.models.get_model(name))
    engine = CamEngine(model)
    assert engine.trace(photos).default_layer == expected
    assert engine.explain(photos).maps.abs().max() > 0


def test_unresolvable_layer_names_the_layer_and_its_shape(photos):
    model, *_ = build("tv_vit_b_16")
    engine = CamEngine(model)
    with pytest.raises(UnknownLayerError, match=r"'heads' outputs \[1000\] per image"):
        engine.explain(photos, layers="heads")
    with pytest.raises(UnknownLayerError, match=r"'encoder.layers.encoder_layer_11.self_attention' outputs no tensor"):
        engine.explain(photos, layers="encoder.layers.encoder_layer_11.self_attention")


def test_fusion_mixes_token_and_spatial_layers(photos):
    model, layer, *_ = build("timm_deit_distilled")
    engine = CamEngine(model)
    fused = engine.explain(photos, method="gradcam", layers=["patch_embed.proj", layer])
    assert engine.trace().layout("patch_embed.proj").kind == "nchw"
    singles = [engine.explain(photos, method="gradcam", layers=name).maps for name in ("patch_embed.proj", layer)]
    expected = (minmax_normalize(singles[0]) + minmax_normalize(singles[1])) / 2
    torch.testing.assert_close(fused.maps, expected, rtol=1e-5, atol=1e-6)


def test_counterfactual_on_tokens_negates_the_gradient(photos):
    model, layer, transform, _ = build("timm_deit_distilled")
    engine = CamEngine(model)
    counter = engine.explain(photos, [[281], [967]], method="hirescam", layers=layer, counterfactual=True)
    # HiResCAM before its ReLU is sum_k g * A: the counterfactual map is ReLU(-that)
    plain = engine.explain(photos, [[281], [967]], method="hirescam", layers=layer)
    activation = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: activation.setdefault("a", out))
    x = photos.clone()
    with torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(False)
        logits = model(x.requires_grad_(True))
        (grad,) = torch.autograd.grad(logits[[0, 1], [281, 967]].sum(), activation["a"])
    handle.remove()
    signed = (transform(grad) * transform(activation["a"])).sum(dim=1)
    torch.testing.assert_close(plain.maps, torch.relu(signed), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(counter.maps, torch.relu(-signed), rtol=1e-4, atol=1e-6)


class TinyNet(nn.Module):
    """conv - activation - conv - activation - pool - linear; `functional` uses F.* instead of modules."""

    def __init__(self, activation: str, functional: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.head = nn.Linear(8, 4)
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU(), "none": nn.Identity()}[activation]
        self.functional = functional
        self.activation = activation

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if not self.functional:
            return self.act(x)
        return {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu}[self.activation](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act(self.conv2(self._act(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_guided_backprop_gates_module_and_functional_activations_alike(activation):
    torch.manual_seed(0)
    modules = TinyNet(activation, functional=False).eval()
    functional = copy.deepcopy(modules)
    functional.functional = True
    x = torch.randn(2, 3, 16, 16)
    a = CamEngine(modules).explain(x, [[1], [2]], method="guided-gradcam", layers="conv2")
    b = CamEngine(functional).explain(x, [[1], [2]], method="guided-gradcam", layers="conv2")
    torch.testing.assert_close(a.guided, b.guided)
    # by hand: positive-gradient gate after every activation, then times the upsampled Grad-CAM map
    weights = nn.functional.interpolate(
        minmax_normalize(a.layer_maps["conv2"]).unsqueeze(1), size=(16, 16), mode="bilinear"
    )
    torch.testing.assert_close(a.guided, input_gradient(modules, x, gate=True) * weights, rtol=1e-4, atol=1e-7)
    ungated = input_gradient(modules, x, gate=False) * weights
    assert (a.guided - ungated).abs().max() > 1e-3 * ungated.abs().max()


def input_gradient(net: TinyNet, x: torch.Tensor, gate: bool) -> torch.Tensor:
    """d logit[i, (1, 2)[i]] / d x, with or without the positive-gradient gate after each activation."""
    wrap = _Gate.apply if gate else (lambda t: t)
    inputs = x.clone().requires_grad_(True)
    h1 = wrap(net.act(net.conv1(inputs)))
    h2 = wrap(net.act(net.conv2(h1)))
    logits = net.head(h2.mean(dim=(2, 3)))
    (gradient,) = torch.autograd.grad(logits[[0, 1], [1, 2]].sum(), inputs)
    return gradient


class _Gate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


def test_guided_gradcam_on_a_vit_is_gated_and_refused_without_activations(photos):
    model, layer, *_ = build("timm_deit_distilled")
    result = CamEngine(model).explain(photos[:1], method="guided-gradcam", layers=layer)
    assert result.guided is not None and result.guided.shape == (1, 3, 224, 224) and result.guided.abs().max() > 0
    linear = TinyNet("none", functional=False).eval()
    with pytest.raises(CamError, match="guided-gradcam needs activation functions"):
        CamEngine(linear).explain(torch.randn(1, 3, 16, 16), method="guided-gradcam", layers="conv2")
