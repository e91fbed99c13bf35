"""Building a model from a ModelSpec: its module, labels and resolved preprocessing (no network, no unpickling)."""

from __future__ import annotations

import dataclasses

from camserve.models.errors import ModelConfigError
from camserve.models.labels import imagenet_labels, read_labels_file
from camserve.models.preprocessing import Preprocessing
from camserve.models.sources import Built
from camserve.models.spec import ModelSpec

__all__ = ["build_model", "imagenet_labels"]


def build_model(spec: ModelSpec) -> Built:
    """Build the spec's source and apply the models file's overrides (labels None: class indices); every failure is
    a ModelConfigError that names the model, a `channels` contradicting what the model says among them."""
    try:
        built = spec.source.build()
        said = built.preprocessing.channels
        if spec.channels is not None and built.channels_from is not None and spec.channels != said:
            raise ModelConfigError(f"channels = {spec.channels} contradicts the model ({built.channels_from}: {said})")
        preprocessing: Preprocessing = built.preprocessing.overridden(
            spec.input_size, spec.mean, spec.std, spec.interpolation, spec.channels
        )
        labels = read_labels_file(spec.labels) if spec.labels is not None else built.labels
    except ModelConfigError as exc:
        raise ModelConfigError(f"model {spec.name!r}: {exc}") from exc
    except Exception as exc:  # any failure while building is a configuration problem of this model
        raise ModelConfigError(f"model {spec.name!r}: cannot be built: {type(exc).__name__}: {exc}") from exc
    return dataclasses.replace(built, preprocessing=preprocessing, labels=labels)
