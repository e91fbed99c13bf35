"""ReciproCAM against a plain forward on EfficientNet-Lite0 (real weights, real photos): the issue's target is at
most 1.3x a forward at batch 1 and 8.

    .venv/bin/python -m bench.bench_reciprocam --batches 1 8 --rounds 30

Each round times, for every batch size, a forward (`engine.predict`) and a ReciproCAM explanation of the top-1
class (`engine.explain`, the forward included) one after the other, so machine noise hits both alike. Prints one
JSON object: per batch size the medians in milliseconds and their ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from bench.bench_engine import photo_batch
from camserve.allocator import keep_freed_memory
from camserve.models import ModelSpec, load_model

#: The issue's target: ReciproCAM at most this multiple of a forward.
TARGET_RATIO = 1.3


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Milliseconds one call of `fn` takes."""
    sync()
    started = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - started) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args()
    tuned = keep_freed_memory()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    engine = load_model(ModelSpec(name="efficientnet-lite0"), device, warmup=False).engine
    inputs = {batch: photo_batch(batch, 224, device) for batch in args.batches}
    contenders: dict[str, Callable[[torch.Tensor], object]] = {
        "forward": engine.predict,
        "reciprocam": lambda x: engine.explain(x, method="reciprocam"),
    }
    times: dict[int, dict[str, list[float]]] = {b: {name: [] for name in contenders} for b in args.batches}
    for round_ in range(args.warmup + args.rounds):
        for batch, x in inputs.items():
            for name, fn in contenders.items():
                elapsed = timed(lambda fn=fn, x=x: fn(x), sync)
                if round_ >= args.warmup:
                    times[batch][name].append(elapsed)
    rows = []
    for batch in args.batches:
        forward, recipro = (statistics.median(times[batch][name]) for name in contenders)
        ratio = recipro / forward
        rows.append(
            {
                "batch": batch,
                "forward_ms": round(forward, 2),
                "reciprocam_ms": round(recipro, 2),
                "ratio": round(ratio, 3),
                "within_target": ratio <= TARGET_RATIO,
            }
        )
    result = {
        "meta": {
            "model": "efficientnet-lite0",
            "layer": engine.default_layer,
            "device": str(device),
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "malloc_tuned": tuned,
            "rounds": args.rounds,
            "target_ratio": TARGET_RATIO,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "rows": rows,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
