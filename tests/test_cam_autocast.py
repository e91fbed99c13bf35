"""Reduced-precision autocast: maps match float32 within the stated tolerance.

Tolerance (documented in docs/methods.md): after min-max normalization, max |difference| <= 0.05 and
Spearman rank correlation >= 0.99 per map.
"""

from __future__ import annotations

import copy

import pytest
import torch

from camserve.cam import CamEngine, metrics
from camserve.cam.render import minmax_normalize
from camserve.device import apply_tf32, tf32_state
from tests.conftest import to_lite_input

TOLERANCE, MIN_SPEARMAN = 0.05, 0.99


def compare(model, x, device, dtype):
    exact = CamEngine(copy.deepcopy(model).to(device))
    reduced = CamEngine(copy.deepcopy(model).to(device), autocast_dtype=dtype)
    for method in ("gradcam", "gradcampp", "layercam"):
        a = exact.explain(x.to(device), [[285], [967]], method=method)
        b = reduced.explain(x.to(device), [[285], [967]], method=method)
        assert b.maps.dtype == torch.float32 and b.logits.dtype == torch.float32
        difference = (minmax_normalize(a.maps) - minmax_normalize(b.maps)).abs().max()
        assert difference <= TOLERANCE, (method, float(difference))
        for i in range(2):
            assert metrics.spearman_rank_correlation(a.maps[i].cpu(), b.maps[i].cpu()) >= MIN_SPEARMAN
        assert torch.equal(a.logits.argmax(1), b.logits.argmax(1))


@pytest.fixture(scope="module")
def photos(chelsea, coffee):
    return torch.cat([to_lite_input(chelsea), to_lite_input(coffee)])


def test_bfloat16_autocast_on_cpu(lite0, photos):
    compare(lite0, photos, "cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_on_cuda(lite0, photos, dtype):
    compare(lite0, photos, "cuda", dtype)


@pytest.fixture
def tf32_off():
    """IEEE float32 on CUDA (CAMSERVE_ALLOW_TF32=false, the default): TF32 convolutions differ by ~1e-3 relative."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    apply_tf32(False)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_maps_match_cpu(lite0, photos, tf32_off):
    assert tf32_state() == {"conv": False, "matmul": False}
    cpu = CamEngine(copy.deepcopy(lite0)).explain(photos, method="gradcampp")
    gpu = CamEngine(copy.deepcopy(lite0).cuda()).explain(photos.cuda(), method="gradcampp")
    assert gpu.maps.device.type == "cuda"
    torch.testing.assert_close(gpu.maps.cpu(), cpu.maps, rtol=1e-3, atol=1e-4)
