"""Load benchmark: drive a running camserve with real photos at several concurrencies.

    .venv/bin/python -m bench.bench_load --spawn --concurrency 1 4 16 64 --duration 20

With --spawn it starts `camserve serve` itself (on --device, port 18123) and stops it afterwards. For each
endpoint (predict, explain with each method) and concurrency it reports throughput (images/s),
p50/p95/p99 latency, the mean batch size the queue formed (from /metrics counters), errors, and the
service's efficiency: HTTP throughput / the engine's own throughput (no HTTP, no decode, no PNG) at the
batch size the queue formed.

Shared machines drift by tens of percent within minutes, so the engine is not measured once at the end:
each cell alternates `--rounds` HTTP segments with engine measurements taken right after them (server
idle, same batch size), and the efficiency is the median of the per-round ratios. The server's own view
comes from /metrics too: how busy its compute thread was (compute seconds / wall seconds) and its compute
time per image under load, which tell whether the engine or the path feeding it is the bottleneck.
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
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import torch
from PIL import Image
from skimage import data

from camserve.allocator import keep_freed_memory
from camserve.images import decode_image, preprocess
from camserve.models import ModelSpec, ServedModel, load_model

PHOTOS = (data.chelsea, data.coffee, data.astronaut, data.rocket)


def jpegs(size: tuple[int, int] | None = None) -> list[bytes]:
    """The benchmark photos as JPEGs (quality 90), at their own sizes or scaled to `size` (width, height)."""
    out = []
    for load in PHOTOS:
        image = Image.fromarray(load())
        if size is not None:
            image = image.resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def parse_size(text: str) -> tuple[int, int]:
    """'1920x1080' -> (1920, 1080)."""
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def server_counters(text: str) -> tuple[float, float, float]:
    """(images computed, engine batches, compute seconds) summed over models, from /metrics text."""

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))

    return (
        total("camserve_inference_items_total"),
        total("camserve_inference_executions_total"),
        total("camserve_compute_seconds_sum"),
    )


@dataclass
class Segment:
    """One stretch of load: what the client saw and what the server counted."""

    latencies: list[float] = field(default_factory=list)
    errors: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0
    items: float = 0.0
    batches: float = 0.0
    compute_s: float = 0.0
    client_cpu_s: float = 0.0

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0


Poster = Callable[[str, bytes], Awaitable[int]]
"""POST a JPEG to a path, return the HTTP status: one simulated user's connection."""


class RawHttpConnection:
    """One keep-alive HTTP/1.1 connection that POSTs bytes and reads the whole answer.

    The load generator shares the cores with the server, so it should cost little: httpx took about 8 %
    of a core at concurrency 16 here, this about 1 %. Answers must carry Content-Length (uvicorn's do).
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, content_type: str = "image/jpeg") -> int:
        reused = self._writer is not None
        try:
            return await self._exchange(path, body, content_type)
        except (ConnectionError, asyncio.IncompleteReadError):
            await self.close()
            if not reused:
                raise
            return await self._exchange(path, body, content_type)  # the server closed an idle connection

    async def _exchange(self, path: str, body: bytes, content_type: str) -> int:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self._writer.write(head.encode("ascii") + body)
        header = await self._reader.readuntil(b"\r\n\r\n")
        status = int(header.split(b" ", 2)[1])
        fields = {}
        for line in header.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip().lower()
        if b"content-length" not in fields:
            await self.close()
            raise ValueError(f"answer without Content-Length (status {status}); this client reads no other framing")
        await self._reader.readexactly(int(fields[b"content-length"]))
        if fields.get(b"connection") == b"close":
            await self.close()
        return status

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            await asyncio.gather(self._writer.wait_closed(), return_exceptions=True)
        self._reader = self._writer = None


def metrics_reader(client: httpx.AsyncClient) -> Callable[[], Awaitable[str]]:
    """Reads the server's /metrics text through `client`."""

    async def metrics() -> str:
        return (await client.get("/metrics")).text

    return metrics


@asynccontextmanager
async def raw_load(url: str, concurrency: int) -> AsyncIterator[tuple[Callable[[], Awaitable[str]], list[Poster]]]:
    """A /metrics reader and `concurrency` raw keep-alive connections to `url`, all closed on exit."""
    connections = [RawHttpConnection(url) for _ in range(concurrency)]
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        try:
            yield metrics_reader(client), [c.post for c in connections]
        finally:
            await asyncio.gather(*(c.close() for c in connections))


def httpx_poster(client: httpx.AsyncClient) -> Poster:
    """A `Poster` over an httpx client (e.g. one bound to the app in-process)."""

    async def post(path: str, body: bytes) -> int:
        return (await client.post(path, content=body, headers={"content-type": "image/jpeg"})).status_code

    return post


async def load_segment(
    metrics: Callable[[], Awaitable[str]], posters: list[Poster], path: str, photos: list[bytes], duration: float
) -> Segment:
    """One closed-loop user per poster, posting raw JPEGs for `duration` seconds; `metrics` reads /metrics."""
    segment = Segment()
    before = server_counters(await metrics())
    deadline = time.perf_counter() + duration

    async def user(index: int, post: Poster) -> None:
        n = index
        while time.perf_counter() < deadline:
            photo = photos[n % len(photos)]
            n += 1
            started = time.perf_counter()
            status = await post(path, photo)
            if status == 200:
                segment.latencies.append(time.perf_counter() - started)
            else:
                segment.errors[status] = segment.errors.get(status, 0) + 1

    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(user(i, post) for i, post in enumerate(posters)))
    segment.elapsed = time.perf_counter() - started
    segment.client_cpu_s = time.process_time() - cpu
    after = server_counters(await metrics())
    segment.items, segment.batches, segment.compute_s = (a - b for a, b in zip(after, before, strict=True))
    return segment


class EngineProbe:
    """The engine alone, in this process, on preprocessed photos: images/s at a given batch size."""

    def __init__(self, photos: list[bytes], device: str) -> None:
        self.photos = photos
        self.served: ServedModel = load_model(ModelSpec(name="efficientnet-lite0"), torch.device(device), warmup=True)
        cuda = self.served.device.type == "cuda"
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)

    def throughput(self, method: str | None, batch: int, seconds: float) -> float:
        served = self.served
        pixels = [decode_image(self.photos[i % len(self.photos)]).pixels for i in range(batch)]
        x = preprocess(
            pixels, served.input_size, served.mean, served.std, served.device, interpolation=served.interpolation
        )

        def run() -> None:
            if method is None:
                served.engine.predict(x)
            else:
                served.engine.explain(x, method=method)
            self.sync()

        run()
        times: list[float] = []
        budget_end = time.perf_counter() + seconds
        while len(times) < 3 or time.perf_counter() < budget_end:
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return batch / statistics.median(times)


async def measure_cell(
    url: str,
    path: str,
    photos: list[bytes],
    concurrency: int,
    duration: float,
    rounds: int,
    probe: EngineProbe,
    engine_seconds: float,
) -> dict:
    """`rounds` x (HTTP segment, engine at the formed batch size); pooled latencies, median ratios."""
    method = None if path == "/predict" else path.split("=", 1)[1]
    segments: list[Segment] = []
    engines: list[float] = []
    async with raw_load(url, concurrency) as (metrics, posters):
        for _ in range(rounds):
            segment = await load_segment(metrics, posters, path, photos, duration / rounds)
            segments.append(segment)
            engines.append(probe.throughput(method, max(1, round(segment.mean_batch)), engine_seconds))
    latencies = sorted(t for s in segments for t in s.latencies)
    errors = dict(sum((Counter(s.errors) for s in segments), Counter()))
    elapsed = sum(s.elapsed for s in segments)
    items = sum(s.items for s in segments)
    compute_s = sum(s.compute_s for s in segments)
    ratios = [s.throughput / e for s, e in zip(segments, engines, strict=True)]

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    return {
        "endpoint": path,
        "concurrency": concurrency,
        "throughput": len(latencies) / elapsed,
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "mean_batch": items / max(1.0, sum(s.batches for s in segments)),
        "requests": len(latencies),
        "errors": errors,
        "engine_throughput": statistics.median(engines),
        "efficiency": statistics.median(ratios),
        "round_efficiencies": ratios,
        "server_busy": compute_s / elapsed,
        "server_compute_ms_per_image": 1000 * compute_s / max(1.0, items),
        "client_cpu_share": sum(s.client_cpu_s for s in segments) / elapsed,
    }


async def warm_up(url: str, path: str, photos: list[bytes]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await load_segment(metrics_reader(client), [httpx_poster(client)] * 4, path, photos, 2.0)


def spawn(port: int, env: dict[str, str], device: str, cwd: Path | None = None) -> subprocess.Popen:
    """`camserve serve` on `port` (from `cwd` when given), once ready and no runtime is still building in the
    background (up to 10 minutes: a first start exports)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "camserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, "CAMSERVE_DEVICE": device, "CAMSERVE_LOG_LEVEL": "warning", **env},
        cwd=cwd,
    )
    for _ in range(3000):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                models = httpx.get(f"http://127.0.0.1:{port}/models", timeout=5).json()["models"]
                if not any(m["runtime"].get("building") for m in models):  # measured on the runtime it settles on
                    return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become ready")


def markdown(rows: list[dict]) -> str:
    lines = [
        "| endpoint | concurrency | images/s | p50 ms | p95 ms | p99 ms | mean batch | errors | engine images/s "
        "at that batch | efficiency (rounds) | server busy | server ms/image | client CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        spread = "/".join(f"{e:.2f}" for e in r["round_efficiencies"])
        lines.append(
            f"| {r['endpoint']} | {r['concurrency']} | {r['throughput']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} "
            f"| {r['p99_ms']:.0f} | {r['mean_batch']:.1f} | {r['errors'] or 0} | {r['engine_throughput']:.1f} "
            f"| **{r['efficiency']:.2f}** ({spread}) | {r['server_busy']:.2f} | {r['server_compute_ms_per_image']:.1f} "
            f"| {r['client_cpu_share']:.0%} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:18123")
    parser.add_argument("--spawn", action="store_true", help="start camserve serve on the --url port")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--duration", type=float, default=24.0, help="seconds of load per cell, over all rounds")
    parser.add_argument("--rounds", type=int, default=4, help="HTTP/engine alternations per cell")
    parser.add_argument("--engine-seconds", type=float, default=2.0, help="engine measurement per round")
    parser.add_argument("--methods", nargs="+", default=["gradcam", "gradcampp"], help="explain methods to drive")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="device for --spawn and the engine probe (cpu or cuda)")
    parser.add_argument("--photo-size", type=parse_size, default=None, help="scale the photos to WxH, e.g. 1920x1080")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    photos = jpegs(args.photo_size)
    process = None
    if args.spawn:
        port = int(args.url.rsplit(":", 1)[1])
        env = {"CAMSERVE_MAX_BATCH_SIZE": str(args.max_batch_size), "CAMSERVE_MAX_QUEUE": "1024"}
        process = spawn(port, env, args.device)
    keep_freed_memory()  # the engine probe runs with the allocator settings `camserve serve` uses
    probe = EngineProbe(photos, args.device)
    rows = []
    try:
        for path in ["/predict"] + [f"/explain?method={m}" for m in args.methods]:
            asyncio.run(warm_up(args.url, path, photos))
            for concurrency in args.concurrency:
                row = asyncio.run(
                    measure_cell(
                        args.url, path, photos, concurrency, args.duration, args.rounds, probe, args.engine_seconds
                    )
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
