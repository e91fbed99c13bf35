"""The GPU path's verdict in one command: every step's result in OUT/summary.json, pass/fail per step.

    python -m bench.gpu_check --device cuda --out "$OUT" --part checks   # pytest -m gpu, sweep, race, corrupt, memory
    python -m bench.gpu_check --device cuda --out "$OUT" --part bench    # bench_engine and bench_load tables

Run through scripts/gpu_check.sh on a lent GPU machine (docs/gpu-check.md). `--device cpu` with small
durations exercises the same logic on any machine (tests/test_gpu_check.py); steps that need CUDA are
then recorded as "skipped: no CUDA". The app runs in this process (httpx's ASGI transport), so the
decode path, the batch worker and the torch thread are the server's own and device memory is readable.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import io
import json
import math
import os
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

STEPS = (
    "environment",
    "pytest_gpu",
    "sweep",
    "race",
    "corrupt_jpeg",
    "memory",
    "onnxruntime",
    "bench_engine",
    "bench_load",
)
PARTS = {"checks": STEPS[:7], "bench": ("environment", "bench_engine", "bench_load"), "all": STEPS}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_SPEARMAN = 0.99
RACE_TOLERANCE = 1e-3  # max |map - baseline| / max |baseline|: batch composition may change kernels, not maps


class Skipped(Exception):
    """A step that cannot run here (the reason is recorded)."""


# -- inputs --------------------------------------------------------------------------------------
def jpeg(megapixels: float, *, progressive: bool = False, gray: bool = False, photo: int = 0) -> bytes:
    """A real photo scaled to about `megapixels` (4:3), as a quality-90 JPEG."""
    source = (data.chelsea, data.coffee, data.astronaut, data.rocket)[photo % 4]()
    width = max(16, round(math.sqrt(megapixels * 1e6 * 4 / 3)))
    image = Image.fromarray(source).resize((width, width * 3 // 4), Image.Resampling.BILINEAR)
    if gray:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, progressive=progressive)
    return buffer.getvalue()


def race_set(max_mp: float) -> dict[str, bytes]:
    """JPEGs from 0.1 MP to `max_mp`, baseline and progressive, colour and grayscale."""
    sizes = sorted({mp for mp in (0.1, 1.0, 4.0, 12.0) if mp <= max_mp} | {max_mp})
    out = {}
    for i, mp in enumerate(sizes):
        out[f"{mp}MP"] = jpeg(mp, photo=i)
        out[f"{mp}MP-progressive"] = jpeg(mp, progressive=True, photo=i + 1)
        out[f"{mp}MP-gray"] = jpeg(mp, gray=True, photo=i + 2)
    return out


def broken_jpegs(good: bytes) -> dict[str, bytes]:
    """JPEGs every decoder must refuse: cut short, header only, Huffman tables zeroed."""
    sos = good.index(b"\xff\xda")
    dht = good.index(b"\xff\xc4")
    zeroed = bytearray(good)
    zeroed[dht + 5 : dht + 21] = bytes(16)  # all code-length counts 0: no valid Huffman code
    return {
        "truncated_half": good[: len(good) // 2],
        "truncated_90": good[: len(good) * 9 // 10],
        "header_only": good[: sos + 2] + b"\xff\xd9",
        "zeroed_huffman": bytes(zeroed),
    }


# -- the app in this process ---------------------------------------------------------------------
@asynccontextmanager
async def serving(device: str, settings: dict[str, str]) -> AsyncIterator[object]:
    """The real app (lifespan included) on `device`, behind an httpx client."""
    import httpx

    from camserve.api import create_app
    from camserve.settings import Settings

    app = create_app(Settings(device=device, warmup=True, max_queue=4096, **settings))
    async with app.router.lifespan_context(app):
        await app.state.loaded.wait()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://camserve", timeout=600) as client:
            yield client


async def explain_raw(client, body: bytes) -> tuple[int, np.ndarray | None, int | None]:
    """(status, raw map of the first explanation, its class) for one JPEG."""
    response = await client.post("/explain?raw=true", content=body, headers={"content-type": "image/jpeg"})
    if response.status_code != 200:
        return response.status_code, None, None
    first = response.json()["results"][0]["explanations"][0]
    return 200, np.asarray(first["cam"], dtype=np.float32), first["index"]


# -- steps ---------------------------------------------------------------------------------------
def step_environment(args: argparse.Namespace) -> dict:
    info: dict = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    import torchvision

    info["torchvision"] = torchvision.__version__
    if torch.cuda.is_available():
        info.update(
            device_name=torch.cuda.get_device_name(),
            cuda=torch.version.cuda,
            capability=".".join(map(str, torch.cuda.get_device_capability())),
            bf16=torch.cuda.is_bf16_supported(),
        )
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        info["nvidia_smi"] = smi.stdout.strip()
    missing = []
    for module in (
        "fastapi",
        "uvicorn",
        "pydantic",
        "pydantic_settings",
        "python_multipart",
        "efficientnet_lite_pytorch",
    ):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    info["missing_modules"] = missing
    info["ok"] = not missing and (args.device == "cpu" or torch.cuda.is_available())
    return info


def step_pytest_gpu(args: argparse.Namespace) -> dict:
    if args.device != "cuda":
        raise Skipped("no CUDA")
    files = sorted(str(p) for p in Path("tests").glob("test_*.py") if "mark.gpu" in p.read_text())
    log = Path(args.out, "pytest_gpu.log")
    with log.open("w") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", "gpu", "-q", *files], stdout=f, stderr=subprocess.STDOUT
        ).returncode
    tail = log.read_text().strip().splitlines()[-1:] or [""]
    return {"ok": rc == 0, "returncode": rc, "files": files, "result": tail[0]}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (1 for two equal constant maps)."""
    try:
        import warnings

        from scipy.stats import spearmanr

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = spearmanr(a.ravel(), b.ravel()).statistic
    except ImportError:
        from camserve.cam import metrics

        value = metrics.spearman_rank_correlation(torch.from_numpy(a), torch.from_numpy(b))
    return 1.0 if math.isnan(value) and np.array_equal(a, b) else float(value)


def step_sweep(args: argparse.Namespace) -> dict:
    """Every method x dtype x {default, earlier, fusion} x counterfactual on `device` against CPU float32."""
    from bench.bench_engine import photo_batch
    from camserve.cam import METHOD_NAMES, CamEngine
    from camserve.models import ModelSpec, load_model

    module = load_model(ModelSpec(name="efficientnet-lite0"), torch.device("cpu"), warmup=False).module
    x = photo_batch(2, 224, torch.device("cpu"))
    targets = [[285, 281], [967]]
    reference = CamEngine(copy.deepcopy(module))
    trace = reference.trace(x)
    default = trace.default_layer
    finer = [n for n in trace.spatial if trace.shapes[n][-1] != trace.shapes[default][-1]]
    shallowest = min((n.count(".") for n in finer), default=0)  # block outputs rather than their insides
    earlier = args.earlier_layer or next((n for n in reversed(finer) if n.count(".") == shallowest), default)
    layer_sets = {"default": [default], "earlier": [earlier], "fusion": [earlier, default]}
    methods = args.methods or list(METHOD_NAMES)
    engines = {
        name: CamEngine(copy.deepcopy(module).to(args.device), autocast_dtype=None if name == "float32" else dtype)
        for name, dtype in DTYPES.items()
        if name in args.dtypes
    }
    rows, ok = [], True
    for method in methods:
        for layer_name, layers in layer_sets.items():
            for counterfactual in (False, True):
                want = reference.explain(x, targets, method=method, layers=layers, counterfactual=counterfactual)
                for dtype, engine in engines.items():
                    got = engine.explain(
                        x.to(args.device), targets, method=method, layers=layers, counterfactual=counterfactual
                    )
                    maps = got.maps.float().cpu().numpy()
                    rhos = [spearman(w, g) for w, g in zip(want.maps.numpy(), maps, strict=True)]
                    row = {
                        "method": method, "dtype": dtype, "layers": layer_name, "counterfactual": counterfactual,
                        "finite": bool(np.isfinite(maps).all()), "device": got.maps.device.type,
                        "min_spearman": round(min(rhos), 5),
                    }  # fmt: skip
                    row["ok"] = row["finite"] and row["device"] == args.device and row["min_spearman"] >= MIN_SPEARMAN
                    ok &= row["ok"]
                    rows.append(row)
    failed = [r for r in rows if not r["ok"]]
    return {
        "ok": ok,
        "cells": len(rows),
        "failed": failed,
        "layers": {"default": default, "earlier": earlier},
        "rows": rows,
    }


async def _race(args: argparse.Namespace) -> dict:
    photos = race_set(args.max_mp)
    async with serving(args.device, args.settings) as client:
        baseline = {}
        for name, body in photos.items():
            status, cam, index = await explain_raw(client, body)
            if status != 200:
                return {"ok": False, "error": f"baseline {name}: HTTP {status}"}
            baseline[name] = (cam, index)
        names = list(photos)
        counts = {"requests": 0, "mismatches": 0, "errors": 0}
        worst = {"relative": 0.0, "name": None}
        deadline = time.monotonic() + args.race_seconds

        async def user(k: int) -> None:
            i = k
            while time.monotonic() < deadline:
                name = names[i % len(names)]
                i += 1
                status, cam, index = await explain_raw(client, photos[name])
                counts["requests"] += 1
                if status != 200:
                    counts["errors"] += 1
                    continue
                want, want_index = baseline[name]
                scale = float(np.abs(want).max()) or 1.0
                relative = float(np.abs(cam - want).max()) / scale if cam.shape == want.shape else math.inf
                if relative > worst["relative"]:
                    worst.update(relative=relative, name=name)
                if relative > RACE_TOLERANCE or index != want_index:
                    counts["mismatches"] += 1

        await asyncio.gather(*(user(k) for k in range(args.concurrency)))
    ok = counts["mismatches"] == 0 and counts["errors"] == 0 and counts["requests"] > 0
    return {"ok": ok, **counts, "worst": worst, "images": names, "concurrency": args.concurrency,
            "seconds": args.race_seconds, "tolerance": RACE_TOLERANCE}  # fmt: skip


def step_race(args: argparse.Namespace) -> dict:
    return asyncio.run(_race(args))


async def _corrupt(args: argparse.Namespace) -> dict:
    good = jpeg(min(args.max_mp, 1.0))
    cases = {}
    async with serving(args.device, args.settings) as client:
        for name, body in broken_jpegs(good).items():
            bad, _, _ = await explain_raw(client, body)
            after, _, _ = await explain_raw(client, good)
            cases[name] = {"status": bad, "next_good_status": after, "ok": bad == 400 and after == 200}
    return {"ok": all(c["ok"] for c in cases.values()), "cases": cases}


def step_corrupt_jpeg(args: argparse.Namespace) -> dict:
    return asyncio.run(_corrupt(args))


async def _memory(args: argparse.Namespace) -> dict:
    body = jpeg(args.max_mp)
    cuda = args.device == "cuda"
    async with serving(args.device, args.settings) as client:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        responses = await asyncio.gather(
            *(
                client.post("/explain?overlay=true", content=body, headers={"content-type": "image/jpeg"})
                for _ in range(args.memory_requests)
            )
        )
        statuses = sorted({r.status_code for r in responses})
        out: dict = {"requests": args.memory_requests, "megapixels": args.max_mp, "statuses": statuses}
        if cuda:
            torch.cuda.synchronize()
            out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
            peak = out["peak_reserved_gib"]
        else:
            out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
            peak = out["peak_rss_gib"]
    out["limit_gib"] = args.memory_limit_gib
    out["ok"] = statuses == [200] and peak <= args.memory_limit_gib
    return out


def step_memory(args: argparse.Namespace) -> dict:
    return asyncio.run(_memory(args))


def _bench(args: argparse.Namespace, name: str, extra: list[str]) -> dict:
    if args.device != "cuda":
        raise Skipped("no CUDA")
    command = [
        sys.executable,
        "-m",
        f"bench.{name}",
        "--device",
        "cuda",
        "--json",
        str(Path(args.out, f"{name}.json")),
        *extra,
    ]
    with Path(args.out, f"{name}.log").open("w") as f:
        rc = subprocess.run(
            command, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        ).returncode
    return {"ok": rc == 0, "returncode": rc, "command": " ".join(command[1:])}


def step_onnxruntime(args: argparse.Namespace) -> dict:
    """ONNX Runtime's providers on this device (CUDA, TensorRT where installed): the runtime layer's logits and
    Grad-CAM++ maps against the eager engine's, and each bucket's timing; skipped where none is installed."""
    from camserve.cam import CamEngine
    from camserve.cam.render import minmax_normalize
    from camserve.models import ModelSpec, load_model
    from camserve.models.runtimes import choose_runtime

    try:
        import onnxruntime
    except ImportError as exc:
        raise Skipped(f"onnxruntime is not installed ({exc})") from None
    providers = onnxruntime.get_available_providers()
    if args.device == "cuda" and "CUDAExecutionProvider" not in providers:
        raise Skipped(f"onnxruntime has no CUDA provider here (install onnxruntime-gpu); it has {providers}")
    device = torch.device(args.device)
    module = load_model(ModelSpec(name="efficientnet-lite0"), device, runtime="eager").module
    example = torch.zeros(1, 3, 224, 224, device=device)
    eager, served = CamEngine(copy.deepcopy(module)), CamEngine(module)
    eager.trace(example)
    served.trace(example)
    choice = choose_runtime(
        "lite0", served, example, mode="onnxruntime", max_batch=16, warmup=True, cache_dir=Path(args.out, "cache")
    )
    x = torch.randn(5, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    a, b = served.explain(x, method="gradcampp"), eager.explain(x, method="gradcampp")
    logit_error = (a.logits - b.logits).abs().max().item()
    map_error = (minmax_normalize(a.maps) - minmax_normalize(b.maps)).abs().max().item()
    return {
        "ok": "onnxruntime" not in choice.not_used and logit_error <= 1e-3 and map_error <= 1e-3,
        "providers": providers,
        "runtime": choice.summary,
        "not_used": choice.not_used,
        "max_logit_error": logit_error,
        "max_map_error": map_error,
    }


def step_bench_engine(args: argparse.Namespace) -> dict:
    return _bench(args, "bench_engine", ["--batches", "1", "8", "32", "--repeats", "30", "20", "10"])


def step_bench_load(args: argparse.Namespace) -> dict:
    extra = ["--spawn", "--concurrency", "1", "16", "64", "--duration", str(args.load_duration), "--rounds", "2"]
    return _bench(args, "bench_load", [*extra, "--engine-seconds", "1"])


STEP_FUNCTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {name: globals()[f"step_{name}"] for name in STEPS}


# -- driver --------------------------------------------------------------------------------------
def run_steps(args: argparse.Namespace) -> dict:
    """Run the chosen steps in order; write OUT/summary.json after each, so a killed run leaves its results."""
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    summary: dict = {"device": args.device, "part": args.part, "started": started, "steps": {}}
    path = Path(args.out, "summary.json")
    for name in args.steps:
        started = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            result = STEP_FUNCTIONS[name](args)
            record = {"status": "pass" if result.pop("ok") else "fail", **result}
        except Skipped as skip:
            record = {"status": "skipped", "reason": f"skipped: {skip}"}
        except Exception as error:  # a step's crash is its verdict; the next steps still run
            record = {"status": "error", "error": repr(error), "traceback": traceback.format_exc()[-4000:]}
        record["seconds"] = round(time.monotonic() - started, 1)
        summary["steps"][name] = record
        print(f"   {record['status']} ({record['seconds']} s)", flush=True)
        summary["passed"] = all(s["status"] in ("pass", "skipped") for s in summary["steps"].values())
        path.write_text(json.dumps(summary, indent=2))
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--part", choices=list(PARTS), default="all")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=None, help="instead of --part")
    parser.add_argument("--methods", nargs="+", default=None, help="sweep: methods (default all)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES), help="sweep: dtypes")
    parser.add_argument("--earlier-layer", default=None, help="sweep: the earlier layer (default: found)")
    parser.add_argument("--race-seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=64, help="race: concurrent requests")
    parser.add_argument("--max-mp", type=float, default=12.0, help="largest JPEG (megapixels) for race and memory")
    parser.add_argument("--memory-requests", type=int, default=32)
    parser.add_argument("--memory-limit-gib", type=float, default=16.0, help="memory: peak above this fails")
    parser.add_argument("--load-duration", type=float, default=8.0, help="bench_load: seconds per cell")
    parser.add_argument("--setting", action="append", default=[], help="KEY=VALUE for the app's Settings")
    args = parser.parse_args(argv)
    args.steps = args.steps or list(PARTS[args.part])
    args.settings = dict(s.split("=", 1) for s in args.setting)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    summary = run_steps(args)
    print(json.dumps({k: v["status"] for k, v in summary["steps"].items()}), flush=True)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
