"""The compute device at start-up: its float32 precision set and what was found logged (no service imports)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The kernel module's version line, e.g. "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 ..."
_NVRM_VERSION = Path("/proc/driver/nvidia/version")
_DRIVER_RE = re.compile(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)")


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (e.g. "580.65.06"), None without one."""
    try:
        match = _DRIVER_RE.search(_NVRM_VERSION.read_text())
    except OSError:
        return None
    return match.group(1) if match else None


def driver_cuda_version() -> str | None:
    """The newest CUDA the installed driver supports (e.g. "13.0"), None without a driver or cuda-bindings."""
    try:
        from cuda.bindings import driver  # torch's own dependency on Linux (torch >= 2.9)

        error, version = driver.cuDriverGetVersion()
    except Exception:  # no package, no libcuda.so, or an old binding API: the log says "unknown"
        return None
    if int(error) != 0:
        return None
    return f"{version // 1000}.{version % 1000 // 10}"


def cudnn_version() -> str | None:
    """cuDNN as "major.minor.patch" (torch reports 92400 for 9.24.0), None without cuDNN."""
    version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if not version:
        return None
    major, rest = divmod(version, 10_000 if version >= 90_000 else 1_000)  # cuDNN 9: 9xxyy; cuDNN 8: 8xyy
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"


def apply_tf32(allow: bool) -> None:
    """TF32 for cuDNN convolutions and CUDA matmuls: on = faster, ~1e-3 relative error; off = IEEE float32.

    Only CUDA backends change (CPU matmuls keep their precision). The allow_tf32 flags, not torch >= 2.9's
    per-operation fp32_precision API: once that API sets "ieee", torch refuses to read the allow_tf32 flags
    (and `torch.backends.cudnn.flags()`, which libraries use, raises), while these flags keep both readable.
    """
    torch.backends.cudnn.allow_tf32 = allow
    torch.backends.cuda.matmul.allow_tf32 = allow


def tf32_state() -> dict[str, bool]:
    """Whether cuDNN convolutions and CUDA matmuls may use TF32 now."""
    return {"conv": bool(torch.backends.cudnn.allow_tf32), "matmul": bool(torch.backends.cuda.matmul.allow_tf32)}


def no_cuda_message() -> str:
    """Why CAMSERVE_DEVICE=cuda found no device: the build, the driver, or no GPU visible."""
    built = torch.version.cuda
    if built is None:
        return f"CAMSERVE_DEVICE=cuda but this torch ({torch.__version__}) is a CPU-only build"
    found = driver_cuda_version()
    if found is None:
        driver = "no NVIDIA driver is visible (check the container's GPU access: --gpus / nvidia.com/gpu)"
    else:
        driver = f"the driver {driver_version() or '(version unknown)'} supports CUDA up to {found}"
    return (
        f"CAMSERVE_DEVICE=cuda but no CUDA device is available: torch {torch.__version__} needs CUDA {built} "
        f"(see docs/deployment.md for the minimum driver); {driver}"
    )


def describe_device(device: torch.device) -> dict[str, object]:
    """What start-up logs about the device: versions, capability, precision and threads."""
    info: dict[str, object] = {"device": str(device), "torch": torch.__version__}
    if device.type != "cuda":
        info["threads"] = torch.get_num_threads()
        return info
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    tf32 = tf32_state()
    info.update(
        name=props.name,
        capability=f"{props.major}.{props.minor}",
        memory_gib=round(props.total_memory / 2**30, 1),
        driver=driver_version() or "unknown",
        driver_cuda=driver_cuda_version() or "unknown",
        cuda=torch.version.cuda,
        cudnn=cudnn_version() or "none",
        tf32_conv=tf32["conv"],
        tf32_matmul=tf32["matmul"],
    )
    return info


def configure_device(device: torch.device, allow_tf32: bool = False) -> None:
    """Set TF32 as configured and log (once, INFO) the device found; called once at start-up."""
    apply_tf32(allow_tf32)
    info = describe_device(device)
    log.info("device: %s", "; ".join(f"{key}={value}" for key, value in info.items()))
