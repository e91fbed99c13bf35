"""CAM engine on vision transformers: explain vs predict and vs pytorch-grad-cam, side by side, on CPU.

    .venv/bin/python -m bench.bench_transformers --batches 1 8 --json docs/bench_transformers_cpu.json
    .venv/bin/python -m bench.bench_transformers --compile --json docs/bench_transformers_compiled_cpu.json

torchvision `vit_b_16` (token layer, class token + 14 × 14 grid) and `swin_t` with seeded random
weights (timing does not depend on the weights; the ViT head, zero-initialised by torchvision, gets
N(0, 0.02) weights so that gradients are not all zero). Per model and batch, interleaved within every
repeat: `predict`, our Grad-CAM and Grad-CAM++ at the engine's automatic default layer, and
pytorch-grad-cam's GradCAM and GradCAMPlusPlus at the same layer (a `reshape_transform` for tokens),
asked for maps at the layer's resolution as the engine returns them. Before timing, once per model,
both sides' maps are compared after min-max normalisation.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torchvision
from torch import nn

from bench.bench_engine import photo_batch, reference_cams, summarize, time_interleaved
from camserve.cam import CamEngine

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
METHODS = ("gradcam", "gradcampp")
EXPLAIN_TARGET = 1.2  # explain ≤ 1.2 × predict
SPEEDUP_TARGET = 3.0  # ≥ 3 × faster than pytorch-grad-cam


def tokens_to_nchw(tokens: torch.Tensor, grid: tuple[int, int], prefix: int) -> torch.Tensor:
    """[B, prefix + h*w, C] tokens → [B, C, h, w]: drop the prefix (class) tokens, channels first."""
    b, _, c = tokens.shape
    return tokens[:, prefix:, :].reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class Setup:
    """A benchmarked model: the layer both sides explain and pytorch-grad-cam's reshape for it."""

    name: str
    layer: str
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None


SETUPS = {
    "vit_b_16": Setup(
        "vit_b_16", "encoder.layers.encoder_layer_11.ln_1", partial(tokens_to_nchw, grid=(14, 14), prefix=1)
    ),
    "swin_t": Setup("swin_t", "permute", None),  # torchvision's own NHWC → NCHW permute: [B, 768, 7, 7]
}


def build_model(name: str) -> nn.Module:
    """torchvision model with seeded random weights; ViT's zero-initialised head gets N(0, 0.02)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    if name.startswith("vit"):
        nn.init.normal_(model.heads.head.weight, std=0.02)
    return model.eval()


def minmax(maps: np.ndarray) -> np.ndarray:
    """Each map [h, w] of [N, h, w] scaled to [0, 1] (all-equal maps become 0)."""
    flat = maps.reshape(len(maps), -1)
    low = flat.min(axis=1, keepdims=True)
    span = flat.max(axis=1, keepdims=True) - low
    return ((flat - low) / np.where(span > 0, span, 1)).reshape(maps.shape)


def max_abs_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Largest difference between two stacks of maps after min-max normalising each map."""
    if ours.shape != theirs.shape:
        raise ValueError(f"map shapes differ: {ours.shape} vs {theirs.shape}")
    return float(np.abs(minmax(ours) - minmax(theirs)).max())


def gradcampp_eq19(activations: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Grad-CAM++ maps [B, h, w] from [B, C, h, w] without pytorch-grad-cam's additive epsilon.

    pytorch-grad-cam computes alpha = g² / (2 g² + (Σ A) g³ + 1e-6); with the small gradients of randomly
    initialised transformers (|g| ~ 1e-5 to 1e-3) the 1e-6 dominates g² and changes the maps. This is eq. 19
    as the engine computes it (alpha = 1 / (2 + (Σ A) g) where g ≠ 0), on pytorch-grad-cam's own A and g.
    """
    spatial_sum = activations.sum(axis=(2, 3), keepdims=True)
    denominator = 2.0 + spatial_sum * grads
    valid = (grads != 0) & (denominator != 0)
    alpha = np.where(valid, 1.0 / np.where(valid, denominator, 1.0), 0.0)
    weights = (alpha * np.maximum(grads, 0)).sum(axis=(2, 3), keepdims=True)
    return np.maximum((weights * activations).sum(axis=1), 0)


def p90_disturbed(rows: list[dict[str, object]], factor: float = 2.0) -> list[str]:
    """Rows whose p90 exceeds `factor` × their median (a sign the shared machine got busy)."""
    return [
        f"{row.get('model', '')} b{row.get('batch', '')} {row['contender']}"
        for row in rows
        if row["p90_ms"] > factor * row["median_ms"]
    ]


def add_speedups(rows: list[dict[str, object]]) -> None:
    """`speedup_vs_pgc` on our rows: pytorch-grad-cam's median ÷ ours, same model, batch and method."""
    for row in rows:
        if str(row["contender"]).startswith("ours "):
            method = str(row["contender"]).removeprefix("ours ")
            ref = next(
                (
                    r
                    for r in rows
                    if r["model"] == row["model"] and r["batch"] == row["batch"] and r["contender"] == f"pgc {method}"
                ),
                None,
            )
            row["speedup_vs_pgc"] = ref["median_ms"] / row["median_ms"] if ref else None


def targets_met(rows: list[dict[str, object]]) -> dict[str, object]:
    ours = [r for r in rows if str(r["contender"]).startswith("ours ")]
    x_predict = [r["x_predict"] for r in ours]
    speedups = [r["speedup_vs_pgc"] for r in ours if r.get("speedup_vs_pgc")]
    return {
        "explain_x_predict_range": [min(x_predict), max(x_predict)],
        "explain_le_1.2x_predict": all(v <= EXPLAIN_TARGET for v in x_predict),
        "speedup_vs_pgc_range": [min(speedups), max(speedups)],
        "ge_3x_faster_than_pgc": all(v >= SPEEDUP_TARGET for v in speedups),
    }


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def markdown_table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| model | batch | contender | median ms | p90 ms | × predict | speed-up vs pytorch-grad-cam |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        speedup = row.get("speedup_vs_pgc")
        lines.append(
            f"| {row['model']} | {row['batch']} | {row['contender']} | {row['median_ms']:.1f} | {row['p90_ms']:.1f} | "
            f"{row['x_predict']:.2f} | {f'{speedup:.1f}×' if speedup else ''} |"
        )
    return "\n".join(lines)


def bench_model(
    setup: Setup, batches: list[int], repeats: list[int], check_batch: int, compiled: bool = False
) -> tuple[list[dict[str, object]], dict[str, object]]:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = build_model(setup.name)
    reference_model = copy.deepcopy(model)  # before the engine freezes the parameters
    for p in reference_model.parameters():  # pytorch-grad-cam backpropagates into the parameters
        p.requires_grad_(True)
    engine = CamEngine(model)
    device = torch.device("cpu")

    def contenders_for(x: torch.Tensor) -> tuple[dict[str, Callable[[], object]], dict[str, object]]:
        top1 = engine.predict(x).argmax(dim=1).tolist()
        targets = [ClassifierOutputTarget(c) for c in top1]
        cams = reference_cams(
            reference_model, setup.layer, METHODS, reshape_transform=setup.reshape_transform, feature_resolution=True
        )
        contenders: dict[str, Callable[[], object]] = {"predict": lambda: engine.predict(x)}
        for method in METHODS:
            contenders[f"ours {method}"] = lambda m=method: engine.explain(x, method=m)
        for method, cam in cams.items():
            contenders[f"pgc {method}"] = lambda cam=cam: cam(input_tensor=x, targets=targets)
        return contenders, cams

    # once per model, before timing: same layer, same targets, same maps
    x = photo_batch(check_batch, 224, device, IMAGENET_MEAN, IMAGENET_STD)
    engine.trace(x)
    if engine.default_layer != setup.layer:
        raise SystemExit(f"{setup.name}: engine's default layer is {engine.default_layer}, expected {setup.layer}")
    if compiled:  # the fast path: predictions and the default layer's maps through the compiled split
        engine.use_fast_path(engine.compile(x[:1], max_batch=max(*batches, check_batch)))
    layout = engine.trace().layouts[setup.layer]
    contenders, cams = contenders_for(x)
    check: dict[str, object] = {"batch": check_batch, "layer": setup.layer, "layout": str(layout)}
    top1 = engine.predict(x).argmax(dim=1)
    for method in METHODS:
        ours = contenders[f"ours {method}"]()
        theirs = np.asarray(contenders[f"pgc {method}"]())
        if not torch.equal(ours.class_index, top1):
            raise SystemExit(f"{setup.name}: explained classes {ours.class_index.tolist()} ≠ top-1 {top1.tolist()}")
        ours_maps = ours.maps.float().numpy()
        check[f"{method}_max_abs_diff"] = max_abs_diff(ours_maps, theirs)
        if method == "gradcampp":  # pytorch-grad-cam's A and g, eq. 19 without its epsilon
            captured = cams[method].activations_and_grads
            eq19 = gradcampp_eq19(captured.activations[0].numpy(), captured.gradients[0].numpy())
            check["gradcampp_max_abs_diff_without_pgc_epsilon"] = max_abs_diff(ours_maps, eq19)
        check["map_shape"] = list(theirs.shape)
    for cam in cams.values():
        cam.activations_and_grads.release()
    print(f"{setup.name}: default layer {setup.layer} ({layout}); maps agree: {check}", flush=True)

    rows: list[dict[str, object]] = []
    for batch, reps in zip(batches, repeats, strict=True):
        x = photo_batch(batch, 224, device, IMAGENET_MEAN, IMAGENET_STD)
        contenders, cams = contenders_for(x)
        started = time.perf_counter()
        times = time_interleaved(contenders, reps, lambda: None)
        for cam in cams.values():  # unhook, so the next batch's pytorch-grad-cam objects run alone
            cam.activations_and_grads.release()
        rows += [{"model": setup.name, "batch": batch, **row, "repeats": reps} for row in summarize(times)]
        print(f"{setup.name} batch {batch}: {reps} repeats in {time.perf_counter() - started:.0f} s", flush=True)
    return rows, check


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, nargs="+", default=None, help="per batch size (default 15, 5)")
    parser.add_argument("--compile", action="store_true", help="our engine on the compiled fast path")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    repeats = args.repeats or [15 if b == 1 else 5 for b in args.batches]
    check_batch = max(args.batches)

    started = time.time()
    rows: list[dict[str, object]] = []
    checks: dict[str, object] = {}
    for name in args.models:
        model_rows, checks[name] = bench_model(SETUPS[name], args.batches, repeats, check_batch, args.compile)
        rows += model_rows
    add_speedups(rows)

    meta = {
        "device": "cpu",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "wall_s": round(time.time() - started),
        "pgc_maps": "feature resolution (no resize to 224), min-max normalised per image by pytorch-grad-cam",
        "weights": "random, torch.manual_seed(0); ViT head N(0, 0.02)",
        "engine": "compiled fast path" if args.compile else "eager",
    }
    summary = targets_met(rows)
    disturbed = p90_disturbed(rows)
    print(f"\n{meta}\nmap agreement: {json.dumps(checks)}\n")
    print(markdown_table(rows))
    print(f"\ntargets: {summary}")
    if disturbed:
        print(f"disturbed (p90 > 2 × median): {disturbed}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"meta": meta, "map_agreement": checks, "targets": summary, "disturbed": disturbed, "rows": rows},
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
