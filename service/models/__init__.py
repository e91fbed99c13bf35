"""Model configuration, loading and the registry of served models."""

from service.models.errors import ModelConfigError
from service.models.registry import ModelRegistry, ServedModel, load_model, resolve_device
from service.models.spec import ModelsFile, ModelSpec, default_models, read_models_file

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
