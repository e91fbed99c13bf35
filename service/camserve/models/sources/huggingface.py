"""kind = "huggingface": a `save_pretrained` folder of any AutoModelForImageClassification (needs `camserve[hf]`)."""

from __future__ import annotations

from types import ModuleType
from typing import Any, Literal

import torch
from PIL import Image
from pydantic import model_validator
from torch import nn

from camserve.cam.heads import Head
from camserve.models.errors import ModelConfigError
from camserve.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from camserve.models.sources.base import Built, LocalPath, Source, import_extra
from camserve.models.weights import few

PREPROCESSOR_CONFIG = "preprocessor_config.json"


class LogitsOnly(nn.Module):
    """A Hugging Face classifier whose forward(x) returns the logits tensor; its modules are under `hf.`."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x, return_dict=True).logits


#: What a Hugging Face `problem_type` says of the logits (regression is not a classifier's head).
_HEADS: dict[str, Head] = {"multi_label_classification": "sigmoid", "single_label_classification": "softmax"}


class HuggingFaceSource(Source):
    """`path` is a local folder with config.json and the weights; loaded with `local_files_only=True`.

    Labels from `config.id2label`. Preprocessing from `preprocessor_config.json` (size, or crop size when the
    processor centre-crops; image_mean, image_std, resample); without it `config.image_size` and ImageNet's
    mean and std, bilinear; the input channels from `config.num_channels`. Any missing, unexpected or mis-shaped
    weight is an error (never re-initialised).
    """

    kind: Literal["huggingface"]
    path: LocalPath | None = None

    @model_validator(mode="after")
    def _needs_path(self) -> HuggingFaceSource:
        if self.path is None:
            raise ValueError("a huggingface model needs `path` (a folder written by save_pretrained)")
        return self

    def build(self) -> Built:
        transformers = import_extra("transformers", "hf")
        folder = self.path
        if folder is None or not (folder / "config.json").is_file():
            raise ModelConfigError(f"{folder} is not a Hugging Face model folder (no config.json)")
        try:
            model, info = transformers.AutoModelForImageClassification.from_pretrained(
                str(folder), local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True
            )  # mis-shaped weights are loaded as new ones and listed in `info`, then refused below
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelConfigError(f"{folder} cannot be loaded as an image classifier: {exc}") from exc
        problems = [few(what.removesuffix("_keys"), keys) for what, keys in _weight_problems(info)]
        if problems:
            raise ModelConfigError(f"weights in {folder} do not fit {type(model).__name__}: " + "; ".join(problems))
        config = model.config
        labels = [str(config.id2label[i]) for i in range(config.num_labels)] if config.id2label else None
        architecture = (config.architectures or [type(model).__name__])[0]
        head = _HEADS.get(getattr(config, "problem_type", None) or "")
        said = "its config's num_channels" if isinstance(getattr(config, "num_channels", None), int) else None
        preprocessing = self._preprocessing(transformers, config)
        return Built(LogitsOnly(model), architecture, preprocessing, labels, head, channels_from=said)

    def _preprocessing(self, transformers: ModuleType, config: Any) -> Preprocessing:
        """From the folder's image processor; without one, `config.image_size` and ImageNet's statistics. The
        channels are `config.num_channels` (3 when the config has none)."""
        folder = self.path
        assert folder is not None
        channels = getattr(config, "num_channels", None)
        channels = channels if isinstance(channels, int) else 3
        if not (folder / PREPROCESSOR_CONFIG).is_file():
            side = int(getattr(config, "image_size", 224))
            return Preprocessing((side, side), IMAGENET_MEAN, IMAGENET_STD, "bilinear", channels=channels)
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelConfigError(f"{folder / PREPROCESSOR_CONFIG} cannot be read: {exc}") from exc
        cropped = getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None)
        size = processor.crop_size if cropped else processor.size
        height, width = _height_width(size, int(getattr(config, "image_size", 224)))
        return Preprocessing(
            (height, width),
            tuple(float(v) for v in getattr(processor, "image_mean", None) or IMAGENET_MEAN),
            tuple(float(v) for v in getattr(processor, "image_std", None) or IMAGENET_STD),
            _filter_name(getattr(processor, "resample", None)),
            channels=channels,
        )


def _filter_name(resample: Any) -> str:
    """A processor's `resample` (PIL's number, or torchvision's InterpolationMode) as a filter name."""
    if resample is None:
        return "bilinear"
    if isinstance(getattr(resample, "value", None), str):
        return str(resample.value).lower()
    return Image.Resampling(int(resample)).name.lower()


def _height_width(size: object, fallback: int) -> tuple[int, int]:
    """(height, width) from a processor size: {height, width}, {shortest_edge} (a square) or an int."""
    if isinstance(size, int):
        return size, size
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    side = get("shortest_edge") or fallback
    return int(side), int(side)


def _weight_problems(info: dict) -> list[tuple[str, list[str]]]:
    """(kind of problem, sorted keys) for each non-empty list of from_pretrained's loading info."""
    kinds = ("missing_keys", "unexpected_keys", "mismatched_keys")
    return [(what, sorted(map(_key, info[what]))) for what in kinds if info.get(what)]


def _key(entry: object) -> str:
    """A key, or a mismatched key's (key, checkpoint shape, model shape) as 'key (3, 32) (the model has (5, 32))'."""
    if isinstance(entry, tuple) and len(entry) == 3:
        key, saved, built = entry
        return f"{key} {tuple(saved)} (the model has {tuple(built)})"
    return str(entry)
