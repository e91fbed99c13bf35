"""kind = "onnx": an ONNX classifier file served by ONNX Runtime (the methods that need no gradient)."""

from __future__ import annotations

from typing import ClassVar, Literal

from camserve.cam.onnx_graph import OnnxGraph, OnnxGraphError
from camserve.models.errors import ModelConfigError
from camserve.models.preprocessing import Preprocessing
from camserve.models.sources.base import Built, FileSource


class OnnxSource(FileSource):
    kind: Literal["onnx"]
    file_words: ClassVar[str] = "an onnx model needs `weights` (the .onnx file)"

    def build(self) -> Built:
        path = self.path()
        try:
            graph = OnnxGraph.load(path)
        except OnnxGraphError as exc:
            raise ModelConfigError(str(exc)) from exc
        height, width = graph.input.size
        size = (height, width) if height is not None and width is not None else (224, 224)  # dynamic: 224
        channels = graph.input.channels
        return Built(graph, "onnx", Preprocessing(size, channels=channels), channels_from="its graph's input")
