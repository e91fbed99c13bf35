"""The compiled fast path against eager, side by side in one process, and time to ready.

    .venv/bin/python -m bench.bench_fastpath --json docs/bench_fastpath_cpu.json     # engine table
    .venv/bin/python -m bench.bench_fastpath --ready                                 # time to /health/ready

Engine: the embedded EfficientNet-Lite0 (real weights, real photos) as four engines — eager and compiled, in
float32 and bfloat16 autocast — and pytorch-grad-cam making the same maps; all contenders of a batch size run
in turns within every repeat. Ready: `camserve serve` (CAMSERVE_RUNTIME=auto) started with an empty cache, then
again on the same cache, then from an empty cache with CAMSERVE_RUNTIME_BUILD=blocking, then with
CAMSERVE_RUNTIME=eager; seconds from spawn until /health/ready answers 200, and until /models says no runtime is
still building in the background.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch

from bench.bench_engine import photo_batch, reference_cams, summarize, time_interleaved
from bench.bench_transformers import cpu_model
from camserve.cam import CamEngine
from camserve.models import ModelSpec, load_model

METHODS = ("gradcam", "gradcampp")


def engines(max_batch: int) -> tuple[dict[str, CamEngine], torch.nn.Module]:
    """Eager and compiled engines in float32 and bfloat16, each over its own copy of Lite0; and a reference copy."""
    module = load_model(ModelSpec(name="efficientnet-lite0"), torch.device("cpu"), warmup=False).module
    example = torch.zeros(1, 3, 224, 224)
    built: dict[str, CamEngine] = {}
    kinds = {"eager": None, "compiled": None, "eager bf16": torch.bfloat16, "compiled bf16": torch.bfloat16}
    for name, dtype in kinds.items():
        engine = CamEngine(copy.deepcopy(module), autocast_dtype=dtype)
        engine.trace(example)
        if name.startswith("compiled"):
            started = time.perf_counter()
            engine.use_fast_path(engine.compile(example, max_batch=max_batch))
            print(f"{name}: compiled in {time.perf_counter() - started:.1f} s", flush=True)
        built[name] = engine
    reference = copy.deepcopy(module)
    for parameter in reference.parameters():  # pytorch-grad-cam backpropagates into the parameters
        parameter.requires_grad_(True)
    return built, reference


def contenders(built: dict[str, CamEngine], reference: torch.nn.Module, x: torch.Tensor):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    runs: dict[str, Callable[[], object]] = {"predict": lambda: built["eager"].predict(x)}
    for name in ("compiled", "eager bf16", "compiled bf16"):
        runs[f"{name} predict"] = lambda e=built[name]: e.predict(x)
    for method in METHODS:
        runs[f"eager {method}"] = lambda m=method: built["eager"].explain(x, method=m)
        runs[f"compiled {method}"] = lambda m=method: built["compiled"].explain(x, method=m)
        runs[f"compiled bf16 {method}"] = lambda m=method: built["compiled bf16"].explain(x, method=m)
    targets = [ClassifierOutputTarget(c) for c in built["eager"].predict(x).argmax(dim=1).tolist()]
    cams = reference_cams(reference, built["eager"].default_layer, METHODS, feature_resolution=True)
    for method, cam in cams.items():
        runs[f"pgc {method}"] = lambda cam=cam: cam(input_tensor=x, targets=targets)
    return runs, cams


def ratios(rows: list[dict[str, object]]) -> dict[str, float]:
    median = {str(r["contender"]): float(r["median_ms"]) for r in rows}  # type: ignore[arg-type]
    out = {
        "compiled_predict_speedup": median["predict"] / median["compiled predict"],
        "compiled_bf16_predict_speedup": median["predict"] / median["compiled bf16 predict"],
    }
    for method in METHODS:
        out[f"{method}_x_eager_predict"] = median[f"compiled {method}"] / median["predict"]
        out[f"{method}_x_compiled_predict"] = median[f"compiled {method}"] / median["compiled predict"]
        out[f"{method}_speedup_vs_pgc"] = median[f"pgc {method}"] / median[f"compiled {method}"]
    return out


def bench_engine(batches: list[int], repeats: list[int]) -> dict[str, object]:
    built, reference = engines(max(batches))
    results: dict[str, object] = {}
    for batch, reps in zip(batches, repeats, strict=True):
        x = photo_batch(batch, 224, torch.device("cpu"))
        check = {
            name: (engine.explain(x, method="gradcampp").maps - built["eager"].explain(x, method="gradcampp").maps)
            .abs()
            .max()
            .item()
            for name, engine in built.items()
        }
        runs, cams = contenders(built, reference, x)
        times = time_interleaved(runs, reps, lambda: None)
        for cam in cams.values():
            cam.activations_and_grads.release()
        rows = summarize(times)
        results[str(batch)] = {"rows": rows, "ratios": ratios(rows), "gradcampp_max_abs_diff_vs_eager": check}
        print(json.dumps({"batch": batch, "ratios": results[str(batch)]["ratios"]}, indent=1), flush=True)  # type: ignore[index]
    return results


def markdown(engine: dict[str, object]) -> str:
    """The engine results as a markdown table (median ms, and ratios to the eager predict)."""
    lines = ["| batch | contender | median ms | p90 ms | × eager predict |", "| ---: | --- | ---: | ---: | ---: |"]
    for batch, result in engine.items():
        for row in result["rows"]:  # type: ignore[index]
            cells = f"{row['median_ms']:.1f} | {row['p90_ms']:.1f} | {row['x_predict']:.2f}"
            lines.append(f"| {batch} | {row['contender']} | {cells} |")
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_ready(env: dict[str, str], timeout_s: float = 900.0) -> dict[str, float]:
    """Seconds from spawning `camserve serve` until /health/ready answers 200 (`ready_s`), and until /models says no
    model's runtime is still building in the background (`built_s`); the server is stopped after."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "camserve.cli", "serve", "--port", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    times: dict[str, float] = {}
    try:
        while time.perf_counter() - started < timeout_s:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with {server.returncode}")
            try:
                if "ready_s" not in times and httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    times["ready_s"] = time.perf_counter() - started
                if "ready_s" in times:
                    models = httpx.get(f"{url}/models", timeout=30).json()["models"]
                    if not any(m["runtime"]["building"] for m in models):
                        times["built_s"] = time.perf_counter() - started
                        return {name: round(value, 2) for name, value in times.items()}
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError("not ready in time")
    finally:
        server.terminate()
        server.wait(timeout=60)


def transformer_models_file(folder: Path) -> str:
    """A models file of EfficientNet-Lite0, ViT-B/16, Swin-T (torchvision) and DeiT-tiny (timm), the last three
    with seeded random weights written to `folder`; returns its path."""
    import timm
    from safetensors.torch import save_file

    from bench.bench_transformers import build_model

    entries = ['[[models]]\nname = "efficientnet-lite0"\n']
    for name in ("vit_b_16", "swin_t"):
        save_file(build_model(name).state_dict(), folder / f"{name}.safetensors")
        entries.append(
            f'[[models]]\nname = "{name}"\nkind = "torchvision"\narchitecture = "{name}"\n'
            f'weights = "{folder / name}.safetensors"\n'
        )
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    save_file(deit.state_dict(), folder / "deit.safetensors")
    entries.append(
        f'[[models]]\nname = "deit-tiny"\nkind = "timm"\narchitecture = "deit_tiny_patch16_224"\n'
        f'weights = "{folder}/deit.safetensors"\n'
    )
    path = folder / "models.toml"
    path.write_text("\n".join(entries))
    return str(path)


def bench_ready(models_file: str | None = None) -> dict[str, dict[str, float]]:
    """The default runtime (auto, built in the background) from an empty cache and again on that cache; auto built
    before readiness from an empty cache; eager. With a models file if given."""
    models = {"CAMSERVE_MODELS_FILE": models_file} if models_file else {}
    with tempfile.TemporaryDirectory() as cache:
        auto = {"CAMSERVE_RUNTIME": "auto", "CAMSERVE_CACHE_DIR": cache, **models}
        results = {"first_start_empty_cache": time_to_ready(auto), "restart_cached": time_to_ready(auto)}
    with tempfile.TemporaryDirectory() as cache:
        blocking = {"CAMSERVE_RUNTIME": "auto", "CAMSERVE_RUNTIME_BUILD": "blocking", "CAMSERVE_CACHE_DIR": cache}
        results["first_start_empty_cache_blocking"] = time_to_ready({**blocking, **models})
        results["eager"] = time_to_ready({"CAMSERVE_RUNTIME": "eager", "CAMSERVE_CACHE_DIR": cache, **models})
    print(json.dumps(results, indent=1), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, nargs="+", default=None, help="per batch size (default 30, 10)")
    parser.add_argument("--ready", action="store_true", help="time to ready instead of the engine table")
    parser.add_argument("--models-file", default=None, help="with --ready: serve this models file")
    parser.add_argument(
        "--transformers", action="store_true", help="with --ready: Lite0, ViT-B/16, Swin-T and DeiT-tiny"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    repeats = args.repeats or [30 if b == 1 else 10 for b in args.batches]
    report: dict[str, object] = {
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {platform.python_version()}",
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "command": " ".join(["python -m bench.bench_fastpath", *sys.argv[1:]]),
    }
    if args.ready:
        models_file = args.models_file
        if args.transformers:
            models_file = transformer_models_file(Path(tempfile.mkdtemp(prefix="bench-ready-")))
        report["ready"] = bench_ready(models_file)
    else:
        report["engine"] = engine = bench_engine(args.batches, repeats)
        print(markdown(engine))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
