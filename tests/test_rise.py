"""RISE (Petsiuk et al. 2018): seeded random masks of the input, weighed by the model's probability."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from camserve.cam.engine import CamEngine
from camserve.cam.heads import probabilities
from camserve.cam.rise import KEEP, RISE
from tests.apphelpers import running_app

JPEG = {"content-type": "image/jpeg"}


class TopLeft(nn.Module):
    """Class 0's logit grows with the brightness of the top-left quarter; class 1 is constant."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.features.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        h, w = a.shape[-2] // 2, a.shape[-1] // 2
        region = a[:, :, :h, :w].mean(dim=(1, 2, 3))
        return torch.stack([8 * (region - 0.5), torch.zeros_like(region)], dim=1)


def test_rise_peaks_where_the_model_looks_and_is_the_same_for_the_same_request():
    engine = CamEngine(TopLeft(), default_layer="features")
    x = torch.ones(2, 3, 48, 48)
    first = engine.explain(x, [[0], [0]], method=RISE(masks=256)).maps
    again = engine.explain(x, [[0], [0]], method=RISE(masks=256)).maps
    torch.testing.assert_close(first, again)  # seeded: the same request, the same map
    torch.testing.assert_close(first[0], first[1])  # the same masks for every image of a batch
    saliency = first[0]
    peak = divmod(int(saliency.argmax()), 48)
    assert peak[0] < 24 and peak[1] < 24  # the map peaks in the top-left quarter
    assert saliency[:24, :24].mean() > saliency[24:, 24:].mean() + 0.05
    assert not torch.equal(first, engine.explain(x, [[0], [0]], method=RISE(masks=256, seed=1)).maps)


def test_rise_is_the_papers_sum_of_masks_weighed_by_probability():
    torch.manual_seed(0)
    layers = (nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    model = nn.Sequential(*layers).eval()
    x = torch.rand(1, 3, 20, 20)
    rise = RISE(masks=40)
    for head in ("softmax", "sigmoid"):
        engine = CamEngine(model, default_layer="1", rerun_batch_size=16, head=head)
        got = engine.explain(x, [[2]], method=rise).maps[0]
        generator = torch.Generator().manual_seed(rise.seed)
        masks = torch.cat([rise.random_masks(generator, n, (20, 20)) for n in (16, 16, 8)])  # the engine's chunks
        with torch.no_grad():
            weights = probabilities(model(x * masks), head)[:, 2]
        expected = torch.relu((weights[:, None, None] * masks[:, 0]).sum(0) / (40 * KEEP))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.anyio
async def test_rise_over_http_takes_its_masks_from_one_option_and_counts_them_against_the_limits(registry, cat_jpeg):
    async with running_app(registry, max_masked_forwards=100) as (client, _app):
        ok = await client.post("/explain?method=rise&rise_masks=32&raw=true", content=cat_jpeg, headers=JPEG)
        again = await client.post("/explain?method=rise&rise_masks=32&raw=true", content=cat_jpeg, headers=JPEG)
        other_method = await client.post("/explain?method=gradcam&rise_masks=32", content=cat_jpeg, headers=JPEG)
        too_many = await client.post("/explain?method=rise&rise_masks=101", content=cat_jpeg, headers=JPEG)
    explanation = ok.json()["results"][0]["explanations"][0]
    assert ok.status_code == 200 and ok.json()["method"] == "rise"
    assert np.asarray(explanation["cam"]).shape == (224, 224)  # the input's resolution
    assert explanation["cam"] == again.json()["results"][0]["explanations"][0]["cam"]
    assert other_method.status_code == 200 and other_method.json()["method"] == "gradcam"  # masks not read
    assert too_many.status_code == 413 and "rise would run 101 extra forward passes" in too_many.json()["detail"]


def test_a_torchscript_model_explains_with_rise_exactly_as_its_source_module_and_refuses_layer_methods():
    module = TopLeft().eval()
    scripted = CamEngine(torch.jit.script(module))
    eager = CamEngine(module, default_layer="features")
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    got = scripted.explain(x, [[0, 1], [0]], method=RISE(masks=96))
    want = eager.explain(x, [[0, 1], [0]], method=RISE(masks=96))
    torch.testing.assert_close(got.maps, want.maps)
    assert got.layers == () and got.pairs == [(0, 0), (0, 1), (1, 0)] == want.pairs
    assert scripted.methods == ("rise",)
    with pytest.raises(Exception, match="TorchScript model takes no hooks.*explains with: rise"):
        scripted.explain(x, method="eigencam")
    with pytest.raises(Exception, match="rise reads no layer"):
        eager.explain(x, method="rise", layers="features")
