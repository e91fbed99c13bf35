"""CAM engine cost: explain vs predict per method and batch size, and vs pytorch-grad-cam, side by side.

    .venv/bin/python -m bench.bench_engine --batches 1 8 32 --json docs/bench_engine_cpu.json

Contenders run interleaved within every repeat so machine noise hits all of them alike; medians and
p90 are reported in milliseconds per batch.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from skimage import data

from camserve.allocator import keep_freed_memory
from camserve.cam import METHOD_NAMES, CamEngine, get_method
from camserve.models import ModelSpec, load_model

PHOTOS = (data.chelsea, data.coffee, data.astronaut, data.rocket)
#: Methods timed here: those without extra forwards (Score-CAM and Ablation-CAM: bench/bench_methods.py).
TIMED_METHODS = tuple(m for m in METHOD_NAMES if get_method(m).family != "perturbation")


def photo_batch(
    batch: int,
    size: int,
    device: torch.device,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> torch.Tensor:
    """Real photos repeated to fill the batch, resized to size × size, normalised with mean/std per channel."""
    tensors = []
    for i in range(batch):
        photo = torch.from_numpy(PHOTOS[i % len(PHOTOS)]()).permute(2, 0, 1)[None].float() / 255
        tensors.append(F.interpolate(photo, size=(size, size), mode="bilinear", antialias=True))
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return ((torch.cat(tensors) - mean_t) / std_t).to(device)


REFERENCE_METHODS = ("gradcam", "gradcampp", "xgradcam", "layercam", "hirescam")


def reference_cams(
    model: torch.nn.Module,
    layer_name: str,
    methods: Sequence[str] = REFERENCE_METHODS,
    *,
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    feature_resolution: bool = False,
) -> dict[str, object]:
    """pytorch-grad-cam's CAM objects at one layer, by our method name.

    Their maps are min-max normalised per image and resized to the input size, or left at the layer's
    resolution with `feature_resolution` (as the engine returns them). Each registers hooks on the
    layer until `cam.activations_and_grads.release()`.
    """
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM

    classes = {
        "gradcam": GradCAM,
        "gradcampp": GradCAMPlusPlus,
        "xgradcam": XGradCAM,
        "layercam": LayerCAM,
        "hirescam": HiResCAM,
    }
    layer = dict(model.named_modules())[layer_name]
    cams = {name: classes[name](model, [layer], reshape_transform=reshape_transform) for name in methods}
    if feature_resolution:
        for cam in cams.values():
            cam.get_target_width_height = lambda input_tensor: None  # scale_cam_image then skips its resize
    return cams


def reference_contenders(model: torch.nn.Module, layer_name: str, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """pytorch-grad-cam producing the same maps (it needs trainable parameters to backpropagate)."""
    from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUModel
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with torch.no_grad():
        top1 = model(x).argmax(dim=1).tolist()
    targets = [ClassifierOutputTarget(c) for c in top1]
    cams = reference_cams(model, layer_name)
    contenders: dict[str, Callable[[], object]] = {
        f"pgc {name}": (lambda cam=cam: cam(input_tensor=x, targets=targets)) for name, cam in cams.items()
    }
    guided = GuidedBackpropReLUModel(copy.deepcopy(model), device=x.device)

    def guided_gradcam() -> object:  # pytorch-grad-cam's guided backprop handles image 0 only: loop
        maps = cams["gradcam"](input_tensor=x, targets=targets)
        return [guided(x[i : i + 1].clone(), target_category=c) * maps[i][..., None] for i, c in enumerate(top1)]

    contenders["pgc guided-gradcam"] = guided_gradcam
    return contenders


def time_interleaved(contenders: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]):
    for fn in contenders.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            sync()
            started = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - started) * 1000)
    return times


def summarize(times: dict[str, list[float]], baseline: str = "predict") -> list[dict[str, object]]:
    """Per contender: median and p90 (nearest rank) in ms, and the median as a multiple of the baseline's."""
    baseline_median = statistics.median(times[baseline])
    rows: list[dict[str, object]] = []
    for name, values in times.items():
        median = statistics.median(values)
        p90 = sorted(values)[min(len(values) - 1, round(0.9 * (len(values) - 1)))]
        rows.append({"contender": name, "median_ms": median, "p90_ms": p90, "x_predict": median / baseline_median})
    return rows


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, nargs="+", default=None, help="per batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-reference", action="store_true", help="skip pytorch-grad-cam")
    parser.add_argument("--memory-calls", type=int, default=200)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--default-malloc", action="store_true", help="leave glibc malloc untuned (the service tunes it)"
    )
    args = parser.parse_args()
    tuned = False if args.default_malloc else keep_freed_memory()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    repeats = args.repeats or [max(3, 48 // b) for b in args.batches]

    served = load_model(ModelSpec(name="efficientnet-lite0"), device, warmup=False)
    engine: CamEngine = served.engine
    reference_model = load_model(ModelSpec(name="efficientnet-lite0"), device, warmup=False).module
    for p in reference_model.parameters():
        p.requires_grad_(True)
    same_layer = "_bn1"  # single-call layer at 7x7; pytorch-grad-cam cannot hook the reused `_swish`

    # memory first, in a clean process state: RSS before/after many explain calls at batch 8
    x = photo_batch(8, 224, device)
    engine.explain(x)
    before = rss_mb()
    for _ in range(args.memory_calls):
        engine.explain(x, method="gradcampp")
    after = rss_mb()

    rows = []
    for batch, reps in zip(args.batches, repeats, strict=True):
        x = photo_batch(batch, 224, device)
        contenders: dict[str, Callable[[], object]] = {"predict": lambda x=x: engine.predict(x)}
        for method in TIMED_METHODS:
            contenders[f"ours {method}"] = lambda x=x, m=method: engine.explain(x, method=m)
        for method in ("gradcam", "gradcampp"):
            contenders[f"ours {method} @{same_layer}"] = lambda x=x, m=method: engine.explain(
                x, method=m, layers=same_layer
            )
        if not args.no_reference:
            contenders.update(reference_contenders(reference_model, same_layer, x))
        times = time_interleaved(contenders, reps, sync)
        rows += [{"batch": batch, **row, "repeats": reps} for row in summarize(times)]
        print(f"batch {batch}: done ({reps} repeats)", flush=True)

    for method in TIMED_METHODS:
        for row in rows:
            if row["contender"] == f"ours {method}":
                ref = next((r for r in rows if r["batch"] == row["batch"] and r["contender"] == f"pgc {method}"), None)
                row["speedup_vs_pgc"] = ref["median_ms"] / row["median_ms"] if ref else None

    meta = {
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "malloc_tuned": tuned,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rss_mb_before": round(before, 1),
        "rss_mb_after": round(after, 1),
        "memory_calls": args.memory_calls,
    }
    print(f"\n{meta}\n")
    print("| batch | contender | median ms | p90 ms | × predict | speed-up vs pytorch-grad-cam |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        speedup = row.get("speedup_vs_pgc")
        speedup_text = f"{speedup:.1f}×" if speedup else ""
        print(
            f"| {row['batch']} | {row['contender']} | {row['median_ms']:.1f} | {row['p90_ms']:.1f} | "
            f"{row['x_predict']:.2f} | {speedup_text} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
