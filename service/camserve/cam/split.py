"""A classifier split at a target layer: `prefix(x) -> (A, *carried)` and `suffix(A, *carried) -> logits`.

The graph comes from `torch.export` (one batch dimension left dynamic), so any model that exports splits,
with no per-architecture code. The cut is the last operation of the layer's last call (the export records
each operation's module path and call number). `carried` are the other prefix values the rest of the network
reads (a residual stream around the layer, for instance); they enter the suffix as constants, exactly as the
hook capture detaches everything before the layer. The prefix runs without autograd and may be compiled;
the suffix runs with autograd from A to the logits (and, without gradients, may be compiled too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, fx, nn

from camserve.cam.errors import CamError


class SplitError(CamError):
    """The model cannot be split at this layer (it does not export, or the layer has no single output)."""


@dataclass
class ModelSplit:
    """The two halves of one model at `layer` (fx GraphModules sharing the exported weights)."""

    layer: str
    prefix: fx.GraphModule
    suffix: fx.GraphModule
    carried: int
    #: How each carried value depends on the batch (`carried_kinds`), once known.
    kinds: tuple[str, ...] | None = None

    def __call__(self, images: Tensor) -> Tensor:
        """Logits through both halves (no autograd): what a plain forward gives."""
        return self.suffix(*self.prefix(images))


def export_model(model: nn.Module, example: Tensor, max_batch: int = 1024) -> fx.GraphModule:
    """The model as an fx graph of ATen operations, batch dimension dynamic; SplitError when it does not export."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        with torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as exc:  # export's failures are many and all mean "serve eagerly"
        raise SplitError(f"the model does not export ({type(exc).__name__}: {_first_line(exc)})") from exc
    return program.module()


def split_model(graph_module: fx.GraphModule, layer: str) -> ModelSplit:
    """Cut an exported model after the last operation of `layer`'s last call."""
    nodes = list(graph_module.graph.nodes)
    cut = _layer_output(nodes, layer)
    position = {node: i for i, node in enumerate(nodes)}
    head = [n for n in nodes if position[n] <= position[cut] and n.op not in ("output", "get_attr")]
    tail = [n for n in nodes if position[n] > position[cut] and n.op not in ("output", "get_attr")]
    (output,) = [n for n in nodes if n.op == "output"]
    needed = _inputs_of([*tail, output])
    if cut not in needed:
        raise SplitError(f"nothing after layer {layer!r} reads its output")
    carried = [n for n in head if n in needed and n is not cut and n.op != "get_attr"]
    prefix = _subgraph(graph_module, head, placeholders=None, outputs=[cut, *carried])
    suffix = _subgraph(graph_module, tail, placeholders=[cut, *carried], outputs=None, output=output)
    return ModelSplit(layer, prefix, suffix, len(carried))


def save_split(split: ModelSplit, path: Path) -> None:
    """Write the split's halves (code and weights) and carried kinds to `path`, atomically: loading it (0.3 s for
    EfficientNet-Lite0) replaces an export (1.5-2 s)."""
    kinds = carried_kinds(split)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    state = {"layer": split.layer, "prefix": split.prefix, "suffix": split.suffix, "carried": split.carried}
    torch.save({**state, "kinds": kinds}, partial)
    partial.replace(path)


def load_split(path: Path, device: torch.device) -> ModelSplit:
    """A split `save_split` wrote (a pickle: the cache directory is trusted as inductor's own cache is)."""
    state = torch.load(path, map_location=device, weights_only=False)
    return ModelSplit(state["layer"], state["prefix"], state["suffix"], state["carried"], tuple(state["kinds"]))


def carried_kinds(split: ModelSplit) -> tuple[str, ...]:
    """How each carried value depends on the batch, read from the suffix's placeholders (export's symbolic
    shapes): "rows" (a tensor with one row per image), "batch" (the batch size), "batch*k" (k times it) or
    "fixed"."""
    if split.kinds is not None:
        return split.kinds
    placeholders = [n for n in split.suffix.graph.nodes if n.op == "placeholder"]
    activation = placeholders[0].meta.get("val")
    if not isinstance(activation, Tensor) or not isinstance(activation.shape[0], torch.SymInt):
        raise SplitError("the layer's output has no dynamic batch dimension")
    batch = activation.shape[0].node.expr
    kinds = []
    for node in placeholders[1:]:
        value = node.meta.get("val")
        if isinstance(value, torch.SymInt):
            ratio = value.node.expr / batch  # a ViT's batch x heads, say
            if not (ratio.is_Integer and ratio > 0):
                raise SplitError(f"a carried size ({value.node.expr}) is not a multiple of the batch size")
            kinds.append("batch" if ratio == 1 else f"batch*{int(ratio)}")
        elif isinstance(value, Tensor):
            first = value.shape[0] if value.dim() else None
            if isinstance(first, torch.SymInt) and first.node.expr == batch:
                kinds.append("rows")
            elif any(isinstance(d, torch.SymInt) for d in value.shape):
                raise SplitError("a carried tensor depends on the batch other than by its rows")
            else:
                kinds.append("fixed")
        else:
            kinds.append("fixed")
    split.kinds = tuple(kinds)
    return split.kinds


def batch_multiple(kind: str) -> int | None:
    """k for a carried size of k times the batch ("batch", "batch*k"), None for other kinds."""
    if kind == "batch":
        return 1
    return int(kind.removeprefix("batch*")) if kind.startswith("batch*") else None


def _layer_output(nodes: list[fx.Node], layer: str) -> fx.Node:
    """The last node run inside module `layer` (so, of its last call), from export's `nn_module_stack`."""
    inside = [
        node
        for node in nodes
        if any(_plain_path(path) == layer for path, _type in (node.meta.get("nn_module_stack") or {}).values())
    ]
    if not inside:
        raise SplitError(f"layer {layer!r} runs no operation of its own in the exported graph")
    if not isinstance(inside[-1].meta.get("val"), Tensor):
        raise SplitError(f"layer {layer!r} does not end in a tensor")
    return inside[-1]


def _plain_path(path: str) -> str:
    """Export's module path ('L__self__.blocks.3' or 'blocks.3') as named_modules() spells it."""
    for prefix in ("L__self__.", "L['self']."):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def _inputs_of(nodes: list[fx.Node]) -> set[fx.Node]:
    found: set[fx.Node] = set()
    for node in nodes:
        found.update(node.all_input_nodes)
    return found


def _subgraph(
    root: fx.GraphModule,
    body: list[fx.Node],
    *,
    placeholders: list[fx.Node] | None,
    outputs: list[fx.Node] | None,
    output: fx.Node | None = None,
) -> fx.GraphModule:
    """A GraphModule over `root`'s attributes that runs `body`; inputs are the original placeholders or
    `placeholders` (values computed elsewhere), it returns `outputs` as a tuple or the original output."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if placeholders is not None:
        for i, node in enumerate(placeholders):
            env[node] = graph.placeholder(f"carried_{i}" if i else "activation")
            env[node].meta = dict(node.meta)

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op != "get_attr":
                raise SplitError(f"the split misses a value ({node.name}) the rest of the network needs")
            env[node] = graph.node_copy(node, lookup)
        return env[node]

    for node in body:
        if node.op == "placeholder" and placeholders is not None:
            continue
        if node.op == "call_module" and node.target == "_guards_fn":
            continue  # export's input checks; the worker's batches always satisfy them
        env[node] = graph.node_copy(node, lookup)
    if outputs is not None:
        graph.output(tuple(lookup(n) for n in outputs))
    else:
        assert output is not None
        results = output.args[0]
        if isinstance(results, (tuple, list)):
            if len(results) != 1:
                raise SplitError(f"the model returns {len(results)} values, not one logits tensor")
            results = results[0]
        graph.output(lookup(results))
    graph.eliminate_dead_code()
    module = fx.GraphModule(root, graph)
    module.meta = {}
    return module


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
