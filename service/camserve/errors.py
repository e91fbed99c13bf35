"""Domain errors raised for problems with what a client sent.

None of these know about HTTP; `camserve.api.errors` maps each class to a status code in one place.
"""

from __future__ import annotations


class CamserveError(Exception):
    """Base class: a problem a client can act on. `str(error)` is the message shown to them."""


class InvalidInputError(CamserveError):
    """The payload cannot be read: undecodable image, bad base64, truncated data."""


class PayloadTooLargeError(CamserveError):
    """The payload exceeds a byte, pixel or item-count limit."""


class UnsupportedMediaError(CamserveError):
    """The payload is of a media type the service does not read."""


class InvalidParameterError(CamserveError, ValueError):
    """A parameter is invalid: unknown method, layer, label, class index out of range, ..."""


class UnknownModelError(CamserveError, LookupError):
    """The requested model is not served."""


class OverloadedError(CamserveError):
    """The queue is full; retry later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReadyError(CamserveError):
    """The service is starting up or shutting down."""


class RequestTimeoutError(CamserveError, TimeoutError):
    """The request did not finish within its time limit."""


class DeviceMemoryError(OverloadedError):
    """The accelerator ran out of memory for a batch; the worker goes on with the next one, so retrying helps."""


class DeviceFailedError(NotReadyError):
    """The accelerator is in an unrecoverable (sticky) error state; this instance must restart."""
