"""Load benchmark: drive a running camserve with real photos at several concurrencies.

    .venv/bin/python -m bench.bench_load --spawn --concurrency 1 4 16 64 --duration 20

With --spawn it starts `camserve serve` itself (on --device, port 18123) and stops it afterwards. For each
endpoint (predict, explain with each method) and concurrency it reports throughput (images/s),
p50/p95/p99 latency, the mean batch size the queue formed (from /metrics counters), errors, and the
engine's own throughput at that batch size without HTTP, so the service's efficiency
(HTTP throughput / engine throughput at the formed batch size) is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time

import httpx
import torch
from PIL import Image
from skimage import data

from service.images import decode_image, preprocess
from service.models import ModelSpec, load_model

PHOTOS = (data.chelsea, data.coffee, data.astronaut, data.rocket)


def jpegs() -> list[bytes]:
    out = []
    for load in PHOTOS:
        buffer = io.BytesIO()
        Image.fromarray(load()).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def counters(text: str) -> tuple[float, float]:
    items = sum(float(v) for v in re.findall(r"^camserve_inference_items_total\{[^}]*\} (\S+)$", text, re.M))
    runs = sum(float(v) for v in re.findall(r"^camserve_inference_executions_total\{[^}]*\} (\S+)$", text, re.M))
    return items, runs


async def drive(url: str, path: str, photos: list[bytes], concurrency: int, duration: float) -> dict:
    latencies: list[float] = []
    errors: dict[int, int] = {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        before = counters((await client.get("/metrics")).text)
        deadline = time.perf_counter() + duration

        async def user(index: int) -> None:
            n = index
            while time.perf_counter() < deadline:
                photo = photos[n % len(photos)]
                n += 1
                started = time.perf_counter()
                response = await client.post(path, content=photo, headers={"content-type": "image/jpeg"})
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors[response.status_code] = errors.get(response.status_code, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(user(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
        after = counters((await client.get("/metrics")).text)
    items, runs = after[0] - before[0], after[1] - before[1]
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    return {
        "throughput": len(latencies) / elapsed,
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "mean_batch": items / runs if runs else 0.0,
        "requests": len(latencies),
        "errors": errors,
    }


def engine_throughput(photos: list[bytes], method: str | None, batch: int, device: str, repeats: int = 5) -> float:
    """Images/s of the engine alone (decode and preprocess excluded) at this batch size."""
    served = load_model(ModelSpec(name="efficientnet-lite0"), torch.device(device), warmup=False)
    pixels = [decode_image(photos[i % len(photos)]).pixels for i in range(batch)]
    x = preprocess(pixels, served.input_size, served.mean, served.std, served.device)
    sync = torch.cuda.synchronize if served.device.type == "cuda" else (lambda: None)

    def run() -> None:
        if method is None:
            served.engine.predict(x)
        else:
            served.engine.explain(x, method=method)

    run()
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - started)
    return batch / statistics.median(times)


def spawn(port: int, env: dict[str, str], device: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, "CAMSERVE_DEVICE": device, "CAMSERVE_LOG_LEVEL": "warning", **env},
    )
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:18123")
    parser.add_argument("--spawn", action="store_true", help="start camserve serve on the --url port")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per cell")
    parser.add_argument("--methods", nargs="+", default=["gradcam", "gradcampp"], help="explain methods to drive")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="device for --spawn and the engine column (cpu or cuda)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    photos = jpegs()
    process = None
    if args.spawn:
        port = int(args.url.rsplit(":", 1)[1])
        process = spawn(
            port, {"CAMSERVE_MAX_BATCH_SIZE": str(args.max_batch_size), "CAMSERVE_MAX_QUEUE": "1024"}, args.device
        )
    rows = []
    try:
        endpoints = ["/predict"] + [f"/explain?method={m}" for m in args.methods]
        for path in endpoints:
            for concurrency in args.concurrency:
                row = asyncio.run(drive(args.url, path, photos, concurrency, args.duration))
                row.update(endpoint=path, concurrency=concurrency)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    engine_cache: dict[tuple[str | None, int], float] = {}
    for row in rows:
        method = None if row["endpoint"] == "/predict" else row["endpoint"].split("=", 1)[1]
        batch = max(1, round(row["mean_batch"]))
        key = (method, batch)
        if key not in engine_cache:
            engine_cache[key] = engine_throughput(photos, method, batch, args.device)
        row["engine_throughput"] = engine_cache[key]
        row["efficiency"] = row["throughput"] / engine_cache[key]
    print(
        "| endpoint | concurrency | images/s | p50 ms | p95 ms | p99 ms | mean batch | errors | engine images/s "
        "at that batch | efficiency |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['endpoint']} | {r['concurrency']} | {r['throughput']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} "
            f"| {r['p99_ms']:.0f} | {r['mean_batch']:.1f} | {r['errors'] or 0} | {r['engine_throughput']:.1f} "
            f"| {r['efficiency']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
