"""Gradient-free methods against pytorch-grad-cam making the same maps, at batch 1 and 8.

    .venv/bin/python -m bench.bench_methods --batches 1 8 --repeats 3 2 --json docs/bench_methods_cpu.json

- Ablation-CAM at `_blocks.15` (320 channels; the default `_swish` would cost pytorch-grad-cam 1280 full forwards
  per image): pytorch-grad-cam with an ablation layer that zeroes (the paper's; its own ablates with min - 1e7 on
  a layer with negative values) re-runs the whole network per ablated channel; camserve re-runs only the network
  after the layer (the split's suffix), in chunks.
- Score-CAM at the default layer `_swish` (1280 channels), which pytorch-grad-cam cannot hook (the module runs
  twice): it gets `_bn1` with ReLU6 as reshape_transform, the same activations. camserve is timed with
  pytorch-grad-cam's weighting (softmax over channels of the masked logits, corner-aligned upsampling) so both
  make the same maps (checked before timing); the paper's weighting costs the same forwards.
Both sides use 32 inputs per forward. Before timing (at the first batch size, which is also the warm-up), each
pair's maps are compared at feature resolution.
Contenders run interleaved within every repeat; medians in milliseconds per batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bench.bench_engine import photo_batch
from camserve.allocator import keep_freed_memory
from camserve.cam import CamEngine
from camserve.cam.perturbation import ScoreCAM
from camserve.cam.render import minmax_normalize
from camserve.models import ModelSpec, load_model

CHUNK = 32
os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam draws a progress bar per image


class PgcWeightedScoreCAM(ScoreCAM):
    """Score-CAM with pytorch-grad-cam's two choices, to time the maps it makes (bench only)."""

    def masks(self, rows: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        up = F.interpolate(rows[:, None], size=size, mode="bilinear", align_corners=True)
        low = up.flatten(1).amin(1)[:, None, None, None]
        high = up.flatten(1).amax(1)[:, None, None, None]
        return (up - low) / (high - low + 1e-8)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float()


def reference(kind: str, model: torch.nn.Module) -> Callable[[torch.Tensor, list[int]], np.ndarray]:
    """pytorch-grad-cam's Ablation-CAM at `_blocks.15` (zeroing) or Score-CAM at `_bn1` + ReLU6, feature resolution."""
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam import ScoreCAM as PgcScoreCAM
    from pytorch_grad_cam.ablation_layer import AblationLayer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class Zeroing(AblationLayer):
        def __call__(self, x, *args, **kwargs):
            output = self.activations
            for i in range(output.size(0)):
                output[i, self.indices[i], :] = 0
            return output

    if kind == "ablationcam":
        cam = AblationCAM(model, [model._blocks[15]], ablation_layer=Zeroing(), batch_size=CHUNK)
    else:
        cam = PgcScoreCAM(model, [model._bn1], reshape_transform=F.relu6)
        cam.batch_size = CHUNK
    cam.get_target_width_height = lambda input_tensor: None

    def run(x: torch.Tensor, targets: list[int]) -> np.ndarray:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, nargs="+", default=[3, 2], help="per batch size")
    parser.add_argument("--methods", nargs="+", default=["ablationcam", "scorecam"])
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--compile", action="store_true", help="camserve on its compiled fast path (CAMSERVE_RUNTIME=compiled's engine)"
    )
    args = parser.parse_args()
    tuned = keep_freed_memory()
    device = torch.device("cpu")
    engine = CamEngine(load_model(ModelSpec(name="efficientnet-lite0"), device, warmup=False).module)
    if args.compile:
        example = torch.zeros(1, 3, 224, 224)
        engine.trace(example)
        engine.use_fast_path(engine.compile(example, max_batch=16))
    layers = {"ablationcam": "_blocks.15", "scorecam": "_swish"}
    ours_method = {"ablationcam": "ablationcam", "scorecam": PgcWeightedScoreCAM()}
    # one model copy per reference: pytorch-grad-cam's hooks stay registered and record every forward
    references = {
        m: reference(m, load_model(ModelSpec(name="efficientnet-lite0"), device, warmup=False).module)
        for m in args.methods
    }

    rows = []
    for batch, reps in zip(args.batches, args.repeats, strict=True):
        x = photo_batch(batch, 224, device)
        with torch.no_grad():
            targets = engine.predict(x).argmax(dim=1).tolist()
        contenders: dict[str, Callable[[], object]] = {}
        for method in args.methods:
            pgc = references[method]

            def ours(x=x, method=method, targets=targets) -> torch.Tensor:
                chosen = ours_method[method]
                return engine.explain(x, [[t] for t in targets], method=chosen, layers=layers[method]).maps

            if batch == args.batches[0]:  # the same maps (and the warm-up), checked once
                mine, theirs = minmax_normalize(ours()).numpy(), pgc(x, targets)
                difference = float(np.abs(mine - theirs).max())
                assert difference < 1e-3, f"{method}: maps differ by {difference}"
            contenders[f"ours {method}"] = ours
            contenders[f"pgc {method}"] = lambda x=x, pgc=pgc, targets=targets: pgc(x, targets)
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(reps):
            for name, fn in contenders.items():
                started = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - started) * 1000)
        for method in args.methods:
            ours_ms = statistics.median(times[f"ours {method}"])
            pgc_ms = statistics.median(times[f"pgc {method}"])
            rows.append(
                {
                    "batch": batch,
                    "method": method,
                    "layer": layers[method],
                    "ours_median_ms": ours_ms,
                    "pgc_median_ms": pgc_ms,
                    "speedup": pgc_ms / ours_ms,
                    "repeats": reps,
                    "ours_ms": times[f"ours {method}"],
                    "pgc_ms": times[f"pgc {method}"],
                }
            )
        print(f"batch {batch}: done ({reps} repeats)", flush=True)

    meta = {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "malloc_tuned": tuned,
        "chunk": CHUNK,
        "compiled": args.compile,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(f"\n{meta}\n")
    print("| batch | method | layer | camserve median ms | pytorch-grad-cam median ms | speed-up |")
    print("| ---: | --- | --- | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['batch']} | {row['method']} | {row['layer']} | {row['ours_median_ms']:.0f} | "
            f"{row['pgc_median_ms']:.0f} | {row['speedup']:.1f}× |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
