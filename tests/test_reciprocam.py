"""ReciproCAM (Byun & Lee 2022) and its token variant: by-hand computations of the masked copies and the network
after the layer, the split against the hook fallback, a ViT's patch grid, and the service over HTTP."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from camserve.cam import CamEngine, CamError, get_method
from camserve.cam import reruns as reruns_module
from camserve.cam.heads import probabilities
from camserve.cam.recipro import ReciproCAM
from camserve.cam.split import SplitError
from camserve.images import decode_image, preprocess
from tests.apphelpers import running_app

JPEG = {"content-type": "image/jpeg"}
#: The papers' 3 x 3 Gaussian weights by offset from the cell: 1/4 at it, 1/8 beside it, 1/16 diagonally.
WEIGHT_AT = {0: 1 / 4, 1: 1 / 8, 2: 1 / 16}


def mask_by_hand(height: int, width: int, y: int, x: int, kernel: str) -> torch.Tensor:
    """The mask of cell (y, x), [h, w]: the Gaussian's weight within one cell of it (0 beyond, and off the grid), or
    1 at the cell only."""
    mask = torch.zeros(height, width)
    for j in range(height):
        for i in range(width):
            dy, dx = abs(j - y), abs(i - x)
            if kernel == "cell":
                mask[j, i] = float(dy == 0 and dx == 0)
            elif dy <= 1 and dx <= 1:
                mask[j, i] = WEIGHT_AT[dy + dx]
    return mask


def captured(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's output for `x` (its last call)."""
    saved: dict[str, torch.Tensor] = {}
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda _m, _i, out: saved.__setitem__("a", out.detach().clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return saved["a"]


class SmallNet(nn.Module):
    """conv -> ReLU (the layer) -> conv -> ReLU -> global average -> linear: a suffix with a non-linearity."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.act = nn.ReLU()
        self.rest = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rest(self.act(self.stem(x))))

    def suffix(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rest(features))


class ChannelsLastNet(SmallNet):
    """SmallNet whose layer outputs a channels-last [B, h, w, C] map (32 channels: only the NHWC reading fits)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Conv2d(3, 32, 3, stride=4, padding=1)
        self.act = nn.Identity()
        self.rest = nn.Sequential(nn.Conv2d(32, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.suffix(self.act(self.stem(x).permute(0, 2, 3, 1)))

    def suffix(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rest(features.permute(0, 3, 1, 2)))


def reciprocam_by_hand(model: SmallNet, x: torch.Tensor, pairs: list[tuple[int, int]], kernel: str, head: str):
    """S_c(y, x) = f_c(suffix(A * M^(y,x))) for each (image, class) pair, one masked copy at a time."""
    activation = captured(model, "act", x)
    channels_last = isinstance(model, ChannelsLastNet)
    height, width = activation.shape[1:3] if channels_last else activation.shape[2:]
    maps = torch.zeros(len(pairs), height, width)
    for n, (image, target) in enumerate(pairs):
        for y in range(height):
            for x_ in range(width):
                mask = mask_by_hand(height, width, y, x_, kernel)
                copy = activation[image] * (mask[..., None] if channels_last else mask)
                with torch.no_grad():
                    maps[n, y, x_] = probabilities(model.suffix(copy[None]), head)[0, target]
    return maps


@pytest.mark.parametrize("kernel", ["gaussian", "cell"])
@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_reciprocam_is_the_head_probability_of_each_cell_masked_copy_computed_by_hand(kernel, head):
    model = SmallNet().eval()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 24, 20)  # a 6 x 5 grid at the layer
    engine = CamEngine(model, default_layer="act", rerun_batch_size=4, head=head)
    explanation = engine.explain(x, [[0, 2], [1]], method=ReciproCAM(kernel))
    assert explanation.maps.shape == (3, 6, 5)
    expected = reciprocam_by_hand(model, x, [(0, 0), (0, 2), (1, 1)], kernel, head)
    torch.testing.assert_close(explanation.maps, expected, atol=1e-6, rtol=1e-5)
    assert engine._reruns._splits["act"] is not None  # the split's suffix ran, not the hook


def test_the_default_kernel_on_a_feature_map_is_one_cell_and_differs_from_the_gaussian():
    model = SmallNet().eval()
    x = torch.randn(1, 3, 24, 20, generator=torch.Generator().manual_seed(3))
    engine = CamEngine(model, default_layer="act")
    default = engine.explain(x, [[1]], method="reciprocam").maps
    assert get_method("reciprocam").kernel is None and get_method("Recipro-CAM").name == "reciprocam"
    torch.testing.assert_close(default, engine.explain(x, [[1]], method=ReciproCAM("cell")).maps)
    assert not torch.allclose(default, engine.explain(x, [[1]], method=ReciproCAM("gaussian")).maps)


def test_a_channels_last_layer_is_masked_in_its_own_layout():
    model = ChannelsLastNet().eval()
    x = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(4))
    engine = CamEngine(model, default_layer="act")
    got = engine.explain(x, [[2]], method="reciprocam").maps
    assert engine.trace().layouts["act"].kind == "nhwc" and got.shape == (1, 6, 6)
    torch.testing.assert_close(got, reciprocam_by_hand(model, x, [(0, 2)], "cell", "softmax"), atol=1e-6, rtol=1e-5)


def test_the_hook_fallback_gives_the_same_map_as_the_split(monkeypatch):
    model = SmallNet().eval()
    x = torch.randn(2, 3, 24, 20, generator=torch.Generator().manual_seed(5))
    by_split = CamEngine(model, default_layer="act", rerun_batch_size=8).explain(x, [[0], [2]], method="reciprocam")

    def no_export(*args: object, **kwargs: object) -> None:
        raise SplitError("the model does not export (test)")

    monkeypatch.setattr(reruns_module, "export_model", no_export)
    engine = CamEngine(model, default_layer="act", rerun_batch_size=8)
    by_hook = engine.explain(x, [[0], [2]], method="reciprocam")
    assert engine._reruns._splits["act"] is None  # the hook replaced the layer's output in full forwards
    torch.testing.assert_close(by_hook.maps, by_split.maps, atol=1e-6, rtol=1e-5)


def test_copies_run_in_chunks_of_the_suffix_batch_each_pausing_first_with_the_same_map(monkeypatch):
    model = SmallNet().eval()
    x = torch.randn(2, 3, 24, 20, generator=torch.Generator().manual_seed(6))
    whole = CamEngine(model, default_layer="act").explain(x, [[0], [1]], method="reciprocam").maps
    pauses: list[int] = []
    monkeypatch.setattr(reruns_module, "pause", lambda: pauses.append(1))
    monkeypatch.setattr(reruns_module, "MAX_SUFFIX_ROWS", 4)
    chunked = CamEngine(model, default_layer="act", rerun_batch_size=4).explain(x, [[0], [1]], method="reciprocam")
    assert len(pauses) == 2 * 8  # 30 cells in chunks of 4 rows, per image
    torch.testing.assert_close(chunked.maps, whole, atol=1e-6, rtol=1e-5)


def test_reciprocam_counts_one_forward_per_image_and_cell_and_refuses_counterfactuals():
    method = get_method("reciprocam")
    assert method.family == "perturbation" and not method.needs_gradient
    assert method.extra_forwards(3, [1280], [49]) == 147
    assert method.extra_forwards(2, [320, 1280], [196, 49]) == 490
    with pytest.raises(ValueError, match="per cell"):
        method.extra_forwards(2, [1280])
    with pytest.raises(CamError, match="reciprocam uses none \\(perturbation method\\)"):
        method.check(counterfactual=True)
    with pytest.raises(ValueError, match="kernel"):
        ReciproCAM("box")  # type: ignore[arg-type]


# -- token variant ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vit() -> nn.Module:
    """timm's ViT-Tiny layout (class token, 16-pixel patches) at 64 x 64, two blocks, seeded random weights."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, embed_dim=48, num_heads=2)
    return model.eval()


def vit_reciprocam_by_hand(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """The last block's input norm masked token by token (class token kept), and the rest of the network written
    out: the block's attention and MLP with their residuals, the final norm and the head."""
    block = model.blocks[1]
    stream = captured(model, "blocks.0", x)[0]  # [17, 48]: the residual stream into the last block
    tokens = captured(model, "blocks.1.norm1", x)[0]
    maps = torch.zeros(4, 4)
    for y in range(4):
        for x_ in range(4):
            mask = torch.cat([torch.ones(1), mask_by_hand(4, 4, y, x_, "gaussian").flatten()])
            with torch.no_grad():
                h = stream + block.ls1(block.attn((tokens * mask[:, None])[None]))[0]
                h = h + block.ls2(block.mlp(block.norm2(h)))
                logits = model.forward_head(model.norm(h[None]))
            maps[y, x_] = torch.softmax(logits, dim=1)[0, target]
    return maps


def test_a_vit_gives_a_patch_grid_map_equal_to_masking_its_tokens_by_hand(tiny_vit):
    assert tiny_vit.head.weight.abs().sum() > 0  # a head that reads the class token
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    engine = CamEngine(tiny_vit)
    layout = engine.trace(x).layouts["blocks.1.norm1"]
    assert (layout.kind, layout.grid, layout.prefix) == ("tokens", (4, 4), 1)
    got = engine.explain(x, [[3], [5]], method="reciprocam", layers="blocks.1.norm1").maps
    assert got.shape == (2, 4, 4)
    torch.testing.assert_close(got[0], vit_reciprocam_by_hand(tiny_vit, x[:1], 3), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], vit_reciprocam_by_hand(tiny_vit, x[1:], 5), atol=1e-5, rtol=1e-4)


# -- over HTTP ------------------------------------------------------------------------------------------------------
def png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


@pytest.mark.anyio
async def test_reciprocam_is_served_with_its_heatmap_alias_and_limits(registry, cat_jpeg):
    text = base64.b64encode(cat_jpeg).decode()
    async with running_app(registry, max_masked_forwards=60) as (client, _app):
        ok = await client.post("/explain?method=reciprocam&raw=true", content=cat_jpeg, headers=JPEG)
        alias = await client.post("/explain?method=recipro-cam", content=cat_jpeg, headers=JPEG)
        counter = await client.post("/explain?method=reciprocam&counterfactual=true", content=cat_jpeg, headers=JPEG)
        two = [("image", ("a.jpg", cat_jpeg, "image/jpeg")), ("image", ("b.jpg", cat_jpeg, "image/jpeg"))]
        over = await client.post("/explain?method=reciprocam", files=two)
        v2 = await client.post(
            "/v2/models/efficientnet-lite0/infer",
            json={
                "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [text]}],
                "parameters": {"method": "reciprocam"},
            },
        )
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["method"] == "reciprocam" and body["layers"] == ["_swish"]
    explanation = body["results"][0]["explanations"][0]
    heat = np.asarray(png(explanation["heatmap"]))
    assert heat.shape == (300, 451) and heat.max() == 255 and heat.min() == 0
    served = registry.get()
    x = preprocess([decode_image(cat_jpeg).pixels], served.input_size, served.mean, served.std)
    direct = served.engine.explain(x, [[explanation["index"]]], method="reciprocam").maps[0]
    np.testing.assert_allclose(np.array(explanation["cam"]), direct.numpy(), rtol=1e-4, atol=1e-6)
    assert np.array(explanation["cam"]).shape == (7, 7)
    assert alias.status_code == 200 and alias.json()["method"] == "reciprocam"
    assert counter.status_code == 422 and "reciprocam uses none (perturbation method)" in counter.json()["detail"]
    assert over.status_code == 413 and over.json()["detail"].startswith(
        "reciprocam would run 98 extra forward passes (2 image(s) x 49 cells of layer(s) _swish (7x7 cells)); "
        "the limit per request is 60"
    )
    assert v2.status_code == 200, v2.text
