"""Explaining models in other forms: an ONNX model against the same PyTorch model, and what RISE costs per mask.

    .venv/bin/python -m bench.bench_any_model --rounds 5 --json docs/bench_any_model_cpu.json

- The allocator tuned as the server tunes it (`camserve.allocator`). EfficientNet-Lite0 with its real ImageNet
  weights, exported to ONNX (the legacy exporter, dynamic batch) and served as `kind = "onnx"` by ONNX Runtime's
  CPU provider, against the same model as `kind = "builtin"` in eager PyTorch (no compiled or ONNX fast path: the
  plain module), both through `load_model`, on 1 and 8 real photos: predictions, Eigen-CAM and Ablation-CAM at
  `_blocks.15` (320 channels; the ONNX tensor of the same module), whose reruns run only the network after the
  layer on both sides. The maps are compared before timing.
- RISE on both, `--masks` masks per image at batch 1: milliseconds per mask, against one image's forward.
Contenders alternate within every round; medians in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench.bench_engine import photo_batch
from camserve.allocator import keep_freed_memory
from camserve.cam.rise import RISE
from camserve.models import ModelSpec, load_model

LAYER = "_blocks.15"


def onnx_tensor_of(served, module_path: str) -> str:
    """The ONNX tensor the module `module_path` outputs last (the legacy exporter names nodes by module path)."""
    names = [n for n in served.engine.trace().shapes if f"/{module_path}/" in n]
    if not names:
        raise SystemExit(f"no ONNX tensor for module {module_path}")
    return names[-1]


def alternate(contenders: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            started = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--masks", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tuned = keep_freed_memory()  # as the server does at start-up
    torch.manual_seed(0)
    torch_model = load_model(ModelSpec(name="efficientnet-lite0", kind="builtin"), torch.device("cpu"), warmup=False)
    module = torch_model.module
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lite0.onnx"
        example = torch.zeros(2, 3, *torch_model.input_size)
        axes = {"images": {0: "batch"}, "logits": {0: "batch"}}
        torch.onnx.export(
            module, (example,), str(path), input_names=["images"], output_names=["logits"], dynamic_axes=axes,
            dynamo=False,
        )  # fmt: skip
        spec = ModelSpec(name="lite0-onnx", kind="onnx", weights=path, mean=(0.5,) * 3, std=(0.5,) * 3)
        onnx_model = load_model(spec, torch.device("cpu"), warmup=False)
    tensor = onnx_tensor_of(onnx_model, LAYER)
    rows: list[dict[str, object]] = []
    for batch in (1, 8):
        x = photo_batch(batch, torch_model.input_size[0], torch.device("cpu"))
        for method in ("eigencam", "ablationcam"):
            a = onnx_model.engine.explain(x, method=method, layers=tensor).maps
            b = torch_model.engine.explain(x, method=method, layers=LAYER).maps
            error = float((a - b).abs().max() / b.abs().max())
            print(f"batch {batch} {method}: ONNX vs PyTorch max relative difference {error:.2e}", flush=True)
        contenders = {
            "onnx predict": lambda x=x: onnx_model.engine.predict(x),
            "torch predict": lambda x=x: torch_model.engine.predict_eager(x),
            "onnx eigencam": lambda x=x: onnx_model.engine.explain(x, method="eigencam", layers=tensor),
            "torch eigencam": lambda x=x: torch_model.engine.explain(x, method="eigencam", layers=LAYER),
            "onnx ablationcam": lambda x=x: onnx_model.engine.explain(x, method="ablationcam", layers=tensor),
            "torch ablationcam": lambda x=x: torch_model.engine.explain(x, method="ablationcam", layers=LAYER),
        }
        medians = alternate(contenders, args.rounds)
        for name, ms in medians.items():
            form, what = name.split()
            rows.append({"batch": batch, "form": form, "what": what, "median_ms": round(ms, 1)})
            print(json.dumps(rows[-1]), flush=True)
    x = photo_batch(1, torch_model.input_size[0], torch.device("cpu"))
    rise = RISE(masks=args.masks)
    medians = alternate(
        {
            "onnx rise": lambda: onnx_model.engine.explain(x, method=rise),
            "torch rise": lambda: torch_model.engine.explain(x, method=rise),
            "onnx forward": lambda: onnx_model.engine.predict(x),
            "torch forward": lambda: torch_model.engine.predict_eager(x),
        },
        max(1, args.rounds // 2),
    )
    for form in ("onnx", "torch"):
        per_mask = medians[f"{form} rise"] / args.masks
        rows.append(
            {
                "batch": 1,
                "form": form,
                "what": f"rise per mask ({args.masks} masks)",
                "median_ms": round(per_mask, 2),
                "x_one_image_forward": round(per_mask / medians[f"{form} forward"], 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    for batch in (1, 8):
        onnx_ms = {r["what"]: r["median_ms"] for r in rows if r["batch"] == batch and r["form"] == "onnx"}
        torch_ms = {r["what"]: r["median_ms"] for r in rows if r["batch"] == batch and r["form"] == "torch"}
        for what in ("predict", "ablationcam"):
            print(f"batch {batch} {what}: PyTorch / ONNX = {torch_ms[what] / onnx_ms[what]:.2f}x", flush=True)
    if args.json:
        meta = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "malloc_tuned": tuned,
            "torch": torch.__version__,
            "command": f"python -m bench.bench_any_model --rounds {args.rounds} --masks {args.masks}",
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
