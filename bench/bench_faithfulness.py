"""Cost of `/explain?faithfulness=true`: the worker's batch compute with and without faithfulness scores.

    .venv/bin/python -m bench.bench_faithfulness --batches 1 8 --steps 16 --json docs/bench_faithfulness_cpu.json

Each contender is `ModelBatches.compute` on one batch of real photos (scikit-image chelsea, coffee, astronaut, rocket,
already at the model's input size), one explanation per image (its top-1 class), Grad-CAM++ at the default layer:
exactly what the service runs on its torch thread for such a batch. `predict` is a plain forward of the same images,
so the extra cost can be read in forwards: faithfulness needs 1 + 2 x steps forwards per explanation. Contenders
run interleaved within every repeat; medians and p90 in milliseconds per batch.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from bench.bench_engine import photo_batch, summarize, time_interleaved
from camserve.allocator import keep_freed_memory
from camserve.batches import ExplainPlan, ModelBatches, WorkItem
from camserve.cam.faithfulness import forwards_per_explanation
from camserve.models import ModelSpec, load_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, nargs="+", default=[16], help="faithfulness_steps to time")
    parser.add_argument("--repeats", type=int, nargs="+", default=None, help="per batch size")
    parser.add_argument("--max-batch-size", type=int, default=16, help="CAMSERVE_MAX_BATCH_SIZE: images per forward")
    parser.add_argument("--compile", action="store_true", help="serve through the compiled fast path (as `auto`)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tuned = keep_freed_memory()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    repeats = args.repeats or [max(3, 24 // b) for b in args.batches]

    served = load_model(
        ModelSpec(name="efficientnet-lite0"),
        device,
        warmup=True,
        runtime="compiled" if args.compile else "eager",
        max_batch=args.max_batch_size,
    )
    worker = ModelBatches(served, max_batch_size=args.max_batch_size)

    def items(pixels: torch.Tensor, options: ExplainPlan) -> list[WorkItem]:
        return [WorkItem(p, options, None) for p in pixels]

    rows = []
    for batch, reps in zip(args.batches, repeats, strict=True):
        pixels = photo_batch(batch, served.input_size[0], torch.device("cpu"), (0.0,) * 3, (1.0,) * 3).clamp(0, 1)
        x = ((pixels - torch.tensor(served.mean).view(1, 3, 1, 1)) / torch.tensor(served.std).view(1, 3, 1, 1)).to(
            device
        )
        explain = ExplainPlan(method="gradcampp", layers=None, counterfactual=False)
        contenders: dict[str, Callable[[], object]] = {
            "predict": lambda x=x: served.engine.predict(x),
            "explain": lambda p=pixels, o=explain: worker.compute(items(p, o)),
        }
        for steps in args.steps:
            scored = ExplainPlan(method="gradcampp", layers=None, counterfactual=False, faithfulness_steps=steps)
            contenders[f"explain + faithfulness {steps}"] = lambda p=pixels, o=scored: worker.compute(items(p, o))
        outputs = worker.compute(items(pixels, scored))
        assert all(o.faithfulness is not None for o in outputs), outputs  # type: ignore[union-attr]
        times = time_interleaved(contenders, reps, sync)
        predict_ms = statistics.median(times["predict"]) / batch
        explain_ms = statistics.median(times["explain"]) / batch
        for row in summarize(times):
            row.update(batch=batch, repeats=reps, per_image_ms=row["median_ms"] / batch)
            name = str(row["contender"])
            if name.startswith("explain + faithfulness"):
                steps = int(name.rsplit(" ", 1)[1])
                extra = row["per_image_ms"] - explain_ms
                row.update(
                    steps=steps,
                    forwards_per_image=forwards_per_explanation(steps),
                    extra_ms_per_image=extra,
                    extra_in_forwards=extra / predict_ms,
                )
            rows.append(row)
        print(f"batch {batch}: done ({reps} repeats)", flush=True)

    meta = {
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "malloc_tuned": tuned,
        "runtime": served.runtime.summary,
        "max_batch_size": args.max_batch_size,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(f"\n{meta}\n")
    print("| batch | contender | median ms | p90 ms | ms / image | extra ms / image | extra in forwards |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        extra = f"{row['extra_ms_per_image']:.0f}" if "extra_ms_per_image" in row else ""
        forwards = (
            f"{row['extra_in_forwards']:.1f} (needs {row['forwards_per_image']})" if "extra_in_forwards" in row else ""
        )
        print(
            f"| {row['batch']} | {row['contender']} | {row['median_ms']:.1f} | {row['p90_ms']:.1f} | "
            f"{row['per_image_ms']:.1f} | {extra} | {forwards} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
