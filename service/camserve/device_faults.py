"""What an exception from the accelerator means for the service: retry later, or restart the process.

Out-of-memory is transient: the batch fails, the next one may fit. A sticky CUDA error (illegal memory
access, device-side assert, launch failure...) leaves the CUDA context unusable: every later kernel fails
until the process restarts.
"""

from __future__ import annotations

import torch

from camserve.errors import DeviceFailedError, DeviceMemoryError

# Substrings (lower case) of the messages of CUDA errors after which the context is corrupt.
STICKY_CUDA_ERRORS: tuple[str, ...] = (
    "illegal memory access",
    "cudaerrorillegaladdress",
    "device-side assert",
    "cudaerrorassert",
    "unspecified launch failure",
    "cudaerrorlaunchfailure",
    "misaligned address",
    "cudaerrormisalignedaddress",
    "illegal instruction",
    "cudaerrorillegalinstruction",
    "uncorrectable ecc error",
    "cudaerrorecc",
    "hardware stack error",
    "cudaerrorhardwarestackerror",
    "invalid program counter",
    "cudaerrorinvalidpc",
    "cuda error: unknown error",
    "cudaerrorunknown",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (the same class as torch.cuda.OutOfMemoryError)."""
    return isinstance(exc, torch.OutOfMemoryError)


def is_sticky_device_error(exc: BaseException) -> bool:
    """A RuntimeError (torch.AcceleratorError included) naming a CUDA error that corrupts the context."""
    if not isinstance(exc, RuntimeError) or is_out_of_memory(exc):
        return False
    message = str(exc).lower()
    return any(marker in message for marker in STICKY_CUDA_ERRORS)


def as_service_error(exc: Exception) -> Exception:
    """Device failures as the domain errors the API maps to 503; anything else unchanged.

    The new errors are built, not raised, so they hold no traceback (and no frame's tensors) of the original.
    """
    if is_out_of_memory(exc):
        return DeviceMemoryError("the model's device ran out of memory for this batch; retry shortly", retry_after_s=1)
    if is_sticky_device_error(exc):
        return DeviceFailedError(f"the model's device failed and this instance must restart: {exc}")
    return exc
