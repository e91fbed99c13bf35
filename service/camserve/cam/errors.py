"""Errors raised by the CAM engine for invalid requests (bad layer, method or target)."""

from __future__ import annotations

from camserve.errors import InvalidParameterError


class CamError(InvalidParameterError):
    """Base class for engine errors caused by what the caller asked for."""


class UnknownMethodError(CamError):
    """The CAM method name is not one the engine implements."""


class MethodUnavailableError(CamError):
    """The model's form cannot run the method (no autograd, no hooks); the message names the methods that work."""


class UnknownLayerError(CamError):
    """A layer path does not name a module of the model (or is unusable as a CAM layer)."""

    def __init__(self, message: str, candidates: list[str] | None = None) -> None:
        super().__init__(message)
        self.candidates = candidates or []


class InvalidTargetError(CamError):
    """Targets do not match the batch, or a class index is out of range."""
