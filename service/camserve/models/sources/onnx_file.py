"""kind = "onnx": an ONNX classifier file served by ONNX Runtime (the methods that need no gradient)."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from camserve.cam.onnx_graph import OnnxGraph, OnnxGraphError
from camserve.models.errors import ModelConfigError
from camserve.models.preprocessing import Preprocessing
from camserve.models.sources.base import Built, LocalPath, Source
from camserve.models.weights import existing


class OnnxSource(Source):
    kind: Literal["onnx"]
    weights: LocalPath | None = None

    @model_validator(mode="after")
    def _needs_file(self) -> OnnxSource:
        if self.weights is None:
            raise ValueError("an onnx model needs `weights` (the .onnx file)")
        return self

    def build(self) -> Built:
        path = existing(self.weights)
        try:
            graph = OnnxGraph.load(path)
        except OnnxGraphError as exc:
            raise ModelConfigError(str(exc)) from exc
        height, width = graph.input.size
        size = (height, width) if height is not None and width is not None else (224, 224)  # dynamic: 224
        channels = graph.input.channels
        return Built(graph, "onnx", Preprocessing(size, channels=channels), channels_from="its graph's input")
