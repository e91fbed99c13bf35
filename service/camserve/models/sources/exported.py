"""kind = "exported": a `torch.export` program (a `.pt2` file from `torch.export.save`), explained by every method.

The program is unflattened into its module hierarchy, so layers are the source module's dotted paths and hooks see
them as on the source; its own graph (when its batch dimension is dynamic) is what the split for the runtimes and
Ablation-CAM's reruns cut, so it is never exported again.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from camserve.models.errors import ModelConfigError
from camserve.models.preprocessing import Preprocessing
from camserve.models.sources.base import Built, FileSource


class ExportedSource(FileSource):
    kind: Literal["exported"]
    file_words: ClassVar[str] = "an exported model needs `weights` (the .pt2 file from torch.export.save)"

    def build(self) -> Built:
        path = self.path()
        try:
            program = torch.export.load(str(path))
            module = torch.export.unflatten(program)
        except Exception as exc:
            raise ModelConfigError(f"{path} is not a torch.export program ({type(exc).__name__}: {exc})") from exc
        shape = _image_shape(program)
        size = (shape[2], shape[3]) if all(isinstance(d, int) for d in shape[2:]) else (224, 224)
        graph = program.module() if not isinstance(shape[0], int) else None  # a fixed batch cannot serve batches
        channels = shape[1] if isinstance(shape[1], int) else 3
        preprocessing = Preprocessing(size, channels=channels)
        return Built(module, "exported", preprocessing, graph=graph, channels_from="its input" if shape[1] else None)


def _image_shape(program: torch.export.ExportedProgram) -> list[object]:
    """The shape of the program's one tensor input, [N, C, H, W] (ints where fixed, symbols where dynamic)."""
    inputs = [
        s for s in program.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT
    ]
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    shapes = [placeholders[s.arg.name].meta.get("val") for s in inputs if hasattr(s.arg, "name")]
    if len(shapes) != 1 or shapes[0] is None or shapes[0].dim() != 4:
        raise ModelConfigError(f"the program must take one [N, C, H, W] image tensor, it takes {len(inputs)} inputs")
    return [int(d) if isinstance(d, int) or str(d).isdigit() else d for d in shapes[0].shape]
