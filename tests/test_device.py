"""Device set-up at start-up: TF32 from CAMSERVE_ALLOW_TF32, the device log line, the no-CUDA message (CPU only)."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

import camserve.device as device_module
from camserve.api import create_app
from camserve.device import configure_device, cudnn_version, driver_cuda_version, driver_version, tf32_state
from camserve.models import ModelConfigError, resolve_device
from camserve.settings import Settings

PROPRIETARY = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.124.06  Wed Feb 26 01:00:00 UTC 2025\nGCC version:\n"
OPEN = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U16)\n"


@pytest.fixture(autouse=True)
def keep_tf32_flags():
    """Tests change process-wide torch flags: put them back."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


@pytest.fixture
def nvrm(tmp_path, monkeypatch):
    """Point the driver lookup at a fake /proc/driver/nvidia/version; returns a writer."""
    path = tmp_path / "version"
    monkeypatch.setattr(device_module, "_NVRM_VERSION", path)
    return path.write_text


@pytest.fixture
def fake_driver_api(monkeypatch):
    """A stand-in for cuda.bindings.driver whose cuDriverGetVersion answers what the test sets."""
    answer = {"value": (0, 13000)}
    driver = types.SimpleNamespace(cuDriverGetVersion=lambda: answer["value"])
    bindings = types.ModuleType("cuda.bindings")
    bindings.driver = driver
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", driver)
    return answer


@pytest.fixture
def fake_h100(monkeypatch, nvrm, fake_driver_api):
    """torch.cuda as an H100 host with driver 580.65.06 and cuDNN 9.24 would answer."""
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props if index == 0 else None)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 92400)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    nvrm(OPEN)


def device_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "camserve.device" and r.levelno == logging.INFO]


@pytest.mark.parametrize("allow", [True, False])
def test_tf32_flags_follow_the_setting(allow):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not allow
    configure_device(torch.device("cpu"), allow_tf32=allow)
    assert torch.backends.cudnn.allow_tf32 is allow and torch.backends.cuda.matmul.allow_tf32 is allow
    assert tf32_state() == {"conv": allow, "matmul": allow}
    # torch >= 2.9's fp32_precision view agrees, and the legacy getters stay readable (cudnn.flags() works)
    if hasattr(torch.backends.cudnn, "conv"):
        assert (torch.backends.cudnn.conv.fp32_precision == "tf32") is allow
        assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if allow else "ieee")
    with torch.backends.cudnn.flags(enabled=True):
        pass


@pytest.mark.anyio
@pytest.mark.parametrize(("env", "allow"), [("true", True), ("false", False), (None, False)])
async def test_start_up_applies_camserve_allow_tf32(monkeypatch, caplog, env, allow):
    """Settings from the environment -> app start-up -> ModelRegistry.load sets the flags before any model."""
    if env is None:
        monkeypatch.delenv("CAMSERVE_ALLOW_TF32", raising=False)
    else:
        monkeypatch.setenv("CAMSERVE_ALLOW_TF32", env)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not allow

    def stop(*_args, **_kwargs):
        raise RuntimeError("stop after the device set-up")

    monkeypatch.setattr("camserve.models.registry.load_model", stop)
    caplog.set_level(logging.INFO, logger="camserve.device")
    app = create_app(Settings(device="cpu", warmup=False))
    async with app.router.lifespan_context(app):
        await app.state.loaded.wait()
    assert tf32_state() == {"conv": allow, "matmul": allow}
    assert len(device_records(caplog)) == 1


def test_cpu_start_up_logs_torch_and_threads(caplog):
    caplog.set_level(logging.INFO, logger="camserve.device")
    configure_device(torch.device("cpu"))
    (line,) = device_records(caplog)
    assert line == f"device: device=cpu; torch={torch.__version__}; threads={torch.get_num_threads()}"


def test_cuda_start_up_logs_device_driver_cuda_cudnn_and_tf32(fake_h100, caplog):
    caplog.set_level(logging.INFO, logger="camserve.device")
    configure_device(torch.device("cuda"), allow_tf32=False)
    (line,) = device_records(caplog)
    fields = dict(part.split("=", 1) for part in line.removeprefix("device: ").split("; "))
    assert fields == {
        "device": "cuda",
        "torch": torch.__version__,
        "name": "NVIDIA H100 80GB HBM3",
        "capability": "9.0",
        "memory_gib": "80.0",
        "driver": "580.65.06",
        "driver_cuda": "13.0",
        "cuda": "13.0",
        "cudnn": "9.24.0",
        "tf32_conv": "False",
        "tf32_matmul": "False",
    }


def test_cuda_log_says_unknown_without_driver_details(fake_h100, fake_driver_api, nvrm, caplog, tmp_path):
    nvrm("no version line here\n")
    fake_driver_api["value"] = (100, 0)  # CUDA_ERROR_NO_DEVICE
    caplog.set_level(logging.INFO, logger="camserve.device")
    configure_device(torch.device("cuda:0"), allow_tf32=True)
    (line,) = device_records(caplog)
    assert "driver=unknown; driver_cuda=unknown;" in line and "tf32_conv=True; tf32_matmul=True" in line


@pytest.mark.parametrize(("text", "expected"), [(PROPRIETARY, "570.124.06"), (OPEN, "580.65.06"), ("", None)])
def test_driver_version_from_the_kernel_module(nvrm, text, expected):
    nvrm(text)
    assert driver_version() == expected


def test_driver_version_without_a_driver(monkeypatch, tmp_path):
    monkeypatch.setattr(device_module, "_NVRM_VERSION", tmp_path / "absent")
    assert driver_version() is None


@pytest.mark.parametrize(("raw", "expected"), [((0, 13000), "13.0"), ((0, 12080), "12.8"), ((3, 0), None)])
def test_driver_cuda_version(fake_driver_api, raw, expected):
    fake_driver_api["value"] = raw
    assert driver_cuda_version() == expected


@pytest.mark.parametrize(("raw", "expected"), [(92400, "9.24.0"), (90100, "9.1.0"), (8907, "8.9.7"), (None, None)])
def test_cudnn_version(monkeypatch, raw, expected):
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: raw)
    assert cudnn_version() == expected


def test_cuda_without_a_device_names_the_driver_it_found(monkeypatch, nvrm, fake_driver_api):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    nvrm(PROPRIETARY)
    fake_driver_api["value"] = (0, 12080)
    with pytest.raises(ModelConfigError) as raised:
        resolve_device("cuda")
    message = str(raised.value)
    assert "no CUDA device is available" in message and "needs CUDA 13.0" in message
    assert "the driver 570.124.06 supports CUDA up to 12.8" in message
    assert resolve_device("auto").type == "cpu"


def test_cuda_without_a_driver_points_at_the_container_runtime(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(device_module, "_NVRM_VERSION", tmp_path / "absent")
    monkeypatch.setattr(device_module, "driver_cuda_version", lambda: None)
    with pytest.raises(ModelConfigError, match=r"no NVIDIA driver is visible .*nvidia\.com/gpu"):
        resolve_device("cuda")


def test_cuda_with_a_cpu_only_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ModelConfigError, match="CPU-only build"):
        resolve_device("cuda")


def test_setting_parses_from_the_environment(monkeypatch):
    monkeypatch.setenv("CAMSERVE_ALLOW_TF32", "1")
    assert Settings().allow_tf32 is True
    monkeypatch.delenv("CAMSERVE_ALLOW_TF32")
    assert Settings().allow_tf32 is False
