"""Start-up errors for model configuration."""

from __future__ import annotations


class ModelConfigError(RuntimeError):
    """A models file or model entry cannot be used; the message names the model and the problem."""
