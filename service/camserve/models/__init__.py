"""Model configuration, loading and the registry of served models."""

from camserve.models.errors import ModelConfigError
from camserve.models.registry import ModelRegistry, ServedModel, load_model, resolve_device
from camserve.models.spec import ModelsFile, ModelSpec, default_models, read_models_file

__all__ = [
    "ModelConfigError",
    "ModelRegistry",
    "ModelSpec",
    "ModelsFile",
    "ServedModel",
    "default_models",
    "load_model",
    "read_models_file",
    "resolve_device",
]
