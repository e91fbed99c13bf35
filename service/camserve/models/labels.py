"""Class names: ImageNet's, or read from a labels file."""

from __future__ import annotations

import json
from pathlib import Path

import torchvision

from camserve.models.errors import ModelConfigError

IMAGENET_CLASSES = 1000


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names that torchvision ships."""
    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def imagenet_labels_if(num_classes: int) -> list[str] | None:
    """ImageNet's names for a 1000-class model, else None (class indices)."""
    return imagenet_labels() if num_classes == IMAGENET_CLASSES else None


def read_labels_file(path: Path) -> list[str]:
    """Labels from a JSON list, a JSON object {"index": "label"} or a text file (one per line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelConfigError(f"labels file {path} cannot be read ({exc})") from exc
    if path.suffix.lower() != ".json":
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"labels file {path} is not valid JSON ({exc})") from exc
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
        f'labels file {path} must be a JSON list of strings or an object {{"0": "label", "1": ...}} with indices 0..N-1'
    )
