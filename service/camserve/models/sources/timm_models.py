"""kind = "timm": any `timm.list_models()` architecture with local weights (needs `camserve[timm]`)."""

from __future__ import annotations

import difflib
from typing import Literal

from camserve.models.errors import ModelConfigError
from camserve.models.labels import imagenet_labels_if
from camserve.models.preprocessing import Preprocessing
from camserve.models.sources.base import Built, LocalPath, Source, import_extra
from camserve.models.weights import classes_in_state, input_channels, load_into, load_state_dict


class TimmSource(Source):
    """`architecture` is a timm model name (optionally with its `.tag`); `weights` a `.safetensors`, `.pth` or `.bin`.

    Created with `pretrained=False`; the class count and the input channels (`in_chans`) are read from the weights
    of the head and the first convolution that timm's pretrained config names; preprocessing defaults (input size,
    mean, std, interpolation) come from that config.
    """

    kind: Literal["timm"]
    architecture: str
    weights: LocalPath

    def build(self) -> Built:
        timm = import_extra("timm", "timm")
        import_extra("timm.data", "timm")
        if not timm.is_model(self.architecture):
            close = difflib.get_close_matches(self.architecture, timm.list_models(), n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
            raise ModelConfigError(f"{self.architecture!r} is not a timm model{hint}")
        try:
            config = timm.models.get_pretrained_cfg(self.architecture)
        except RuntimeError as exc:  # e.g. an unknown pretrained tag
            raise ModelConfigError(f"timm model {self.architecture!r}: {exc}") from exc
        state = load_state_dict(self.weights)
        heads = config.classifier if config is not None else None
        head = heads[0] if isinstance(heads, list | tuple) else heads
        num_classes = classes_in_state(state, head) if head else None
        kwargs = {"num_classes": num_classes} if num_classes else {}
        convs = config.first_conv if config is not None else None
        first = convs[0] if isinstance(convs, list | tuple) else convs
        in_chans = input_channels(state, first) if first else None
        if in_chans is not None:
            kwargs["in_chans"] = in_chans
        model = timm.create_model(self.architecture, pretrained=False, **kwargs)
        load_into(model, state, self.architecture)
        data = timm.data.resolve_data_config(pretrained_cfg=config.to_dict() if config is not None else {})
        _, height, width = data["input_size"]
        preprocessing = Preprocessing(
            (height, width), tuple(data["mean"]), tuple(data["std"]), data["interpolation"], channels=in_chans or 3
        )
        said = f"the weights of its first convolution {first}" if in_chans is not None else None
        return Built(model, self.architecture, preprocessing, imagenet_labels_if(model.num_classes), channels_from=said)
