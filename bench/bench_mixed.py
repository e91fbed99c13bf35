"""Mixed load: does a cheap request stay cheap beside someone else's Score-CAM? (issue: fair under mixed load)

    git worktree add /tmp/before <commit before the scheduler>
    .venv/bin/python -m bench.bench_mixed --before /tmp/before --seconds 60 --json docs/bench_mixed_cpu.json

For each server (this tree, and `--before` if given; one at a time, each on the same port and photos):
`/predict` and Grad-CAM++ `/explain` alone (20 sequential requests each), then the same `/predict` loop for
`--seconds` while four other clients loop `/explain`: two Score-CAM, one Ablation-CAM, one Grad-CAM++ (224 px
photos, the embedded Lite0, default settings); with `--short-heavy`, a fifth client loops short heavy work
(Grad-CAM++ with faithfulness scores). Reports p50/p95 of each, the loaded/alone ratios, and Score-CAM maps per
minute.

    .venv/bin/python -m bench.bench_mixed --before /tmp/before --bound --seconds 90 --json FILE

With `--bound`, an upper bound on the Score-CAM throughput any scheduler could keep while `/predict` and Grad-CAM++
meet their 3x targets, from what this tree's server spends: the two cheap clients loop at the slowest pace the
targets allow (each request sent 3x its p95 alone after the one before), and the server's CPU time over the window
(the default server's, or a one-intra-op-thread server's at the same pace, whichever is less) is what they need at
the least; two Score-CAM clients alone on each server give maps per minute per core. The cores left after the cheap
clients, at the better of those rates, are the most the Score-CAMs can get, against `--before`'s Score-CAM
throughput under the mixed load (both counted as answers per mean latency of each closed-loop client).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable
from pathlib import Path

import httpx

from bench.bench_load import jpegs, spawn

PORT = 8131
BACKGROUND = {
    "scorecam-1": "/explain?method=scorecam",
    "scorecam-2": "/explain?method=scorecam",
    "ablationcam": "/explain?method=ablationcam",
    "gradcampp": "/explain?method=gradcampp",
}


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"n": len(values), "p50_ms": round(statistics.median(values) * 1000, 1), "p95_ms": round(p95 * 1000, 1)}


async def post(client: httpx.AsyncClient, path: str, photo: bytes) -> float:
    started = time.perf_counter()
    response = await client.post(path, content=photo, headers={"content-type": "image/jpeg"})
    response.raise_for_status()
    return time.perf_counter() - started


async def sequential(client: httpx.AsyncClient, path: str, photos: list[bytes], count: int) -> list[float]:
    return [await post(client, path, photos[i % len(photos)]) for i in range(count)]


async def paced(
    client: httpx.AsyncClient, path: str, photos: list[bytes], period: float, until: float, out: list[float]
) -> None:
    """Like `loop`, but each request starts `period` seconds after the one before (or when it is answered)."""
    i = 0
    while time.perf_counter() < until:
        started = time.perf_counter()
        out.append(await post(client, path, photos[i % len(photos)]))
        i += 1
        await asyncio.sleep(max(0.0, started + period - time.perf_counter()))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process `pid`, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cores_during(pid: int, work: Awaitable[object]) -> float:
    """The CPU cores process `pid` used on average while `work` ran."""
    cpu, started = cpu_seconds(pid), time.perf_counter()
    await work
    return (cpu_seconds(pid) - cpu) / (time.perf_counter() - started)


def maps_per_min(latencies: list[list[float]]) -> float:
    """Closed-loop clients' answers per minute from their latencies (each answers once per mean latency)."""
    return round(sum(60.0 / statistics.fmean(each) for each in latencies if each), 2)


async def loop(client: httpx.AsyncClient, path: str, photos: list[bytes], until: float, out: list[float]) -> None:
    i = 0
    while time.perf_counter() < until:
        out.append(await post(client, path, photos[i % len(photos)]))
        i += 1


#: With --short-heavy: a client whose heavy work is short (faithfulness scores, ~20 forwards), beside the Score-CAMs.
SHORT_HEAVY = {"faithfulness": "/explain?method=gradcampp&faithfulness=true&faithfulness_steps=4"}


async def measure(url: str, seconds: float, background: dict[str, str]) -> dict:
    photos = jpegs((224, 224))
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for path in ("/predict", *background.values()):
            await post(client, path, photos[0])  # warm every path once
        alone = {
            "predict": percentiles(await sequential(client, "/predict", photos, 20)),
            "gradcampp": percentiles(await sequential(client, "/explain?method=gradcampp", photos, 20)),
        }
        for name in set(SHORT_HEAVY) & set(background):
            alone[name] = percentiles(await sequential(client, background[name], photos, 10))
        started = time.perf_counter()
        until = started + seconds
        latencies: dict[str, list[float]] = {name: [] for name in background}
        tasks = [
            asyncio.create_task(loop(client, path, photos, until, latencies[name])) for name, path in background.items()
        ]
        await asyncio.sleep(1.0)  # the heavy clients are in
        predict: list[float] = []
        await loop(client, "/predict", photos, until, predict)
        for task in tasks:  # a heavy request may still run; what finished inside the window counts
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        window = time.perf_counter() - started
    scorecam = len(latencies["scorecam-1"]) + len(latencies["scorecam-2"])
    loaded = {
        "predict": percentiles(predict),
        "gradcampp": percentiles(latencies["gradcampp"]),
        "ablationcam": percentiles(latencies["ablationcam"]) if latencies["ablationcam"] else {"n": 0},
        "scorecam_maps_per_min": round(scorecam * 60 / window, 2),
        "scorecam_maps_per_min_by_latency": maps_per_min([latencies["scorecam-1"], latencies["scorecam-2"]]),
    }
    for name in set(SHORT_HEAVY) & set(latencies):
        loaded[name] = percentiles(latencies[name]) if latencies[name] else {"n": 0}
    return {
        "alone": alone,
        "loaded": loaded,
        "predict_p95_ratio": round(loaded["predict"]["p95_ms"] / alone["predict"]["p95_ms"], 2),
        "gradcampp_p95_ratio": round(loaded["gradcampp"]["p95_ms"] / alone["gradcampp"]["p95_ms"], 2)
        if latencies["gradcampp"]
        else None,
    }


CHEAP = {"predict": "/predict", "gradcampp": "/explain?method=gradcampp"}


async def cheap_cores(url: str, pid: int, seconds: float, periods: dict[str, float] | None = None) -> dict:
    """The server's CPU (cores) while `/predict` and Grad-CAM++ clients each send a request every `periods[name]`
    seconds (or when the one before is answered); without `periods`, 3x each one's p95 alone, measured first."""
    photos = jpegs((224, 224))
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for path in CHEAP.values():
            await post(client, path, photos[0])
        alone = {name: percentiles(await sequential(client, path, photos, 20)) for name, path in CHEAP.items()}
        periods = periods or {name: 3 * alone[name]["p95_ms"] / 1000 for name in CHEAP}
        latencies: dict[str, list[float]] = {name: [] for name in CHEAP}
        until = time.perf_counter() + seconds
        pacing = (paced(client, CHEAP[n], photos, periods[n], until, latencies[n]) for n in CHEAP)
        cores = await cores_during(pid, asyncio.gather(*pacing))
    return {
        "alone": alone,
        "periods_s": periods,
        "paced": {name: percentiles(values) for name, values in latencies.items()},
        "server_cores": round(cores, 3),
    }


async def scorecam_alone(url: str, pid: int, seconds: float) -> dict:
    """Two Score-CAM clients and nothing else: maps per minute and the server's CPU (cores)."""
    photos = jpegs((224, 224))
    heavy: list[list[float]] = [[], []]
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await post(client, BACKGROUND["scorecam-1"], photos[0])
        until = time.perf_counter() + seconds
        loops = (loop(client, BACKGROUND["scorecam-1"], photos, until, out) for out in heavy)
        cores = await cores_during(pid, asyncio.gather(*loops))
    return {"maps_per_min": maps_per_min(heavy), "server_cores": round(cores, 3)}


def bound(tree: Path, seconds: float) -> dict:
    """This tree's bound: the cores left to Score-CAM after the cheap clients' least CPU (default threads, or one
    intra-op thread at the same pace, whichever needs less), at the most maps per core either server gave alone."""
    runs: dict = {}
    for name, env in (("default", {}), ("one_thread", {"CAMSERVE_TORCH_THREADS": "1"})):
        process = spawn(PORT, {"PYTHONPATH": str(tree / "service"), **env}, "cpu", cwd=tree)
        try:
            url = f"http://127.0.0.1:{PORT}"
            periods = runs["default"]["periods_s"] if runs else None
            runs[name] = asyncio.run(cheap_cores(url, process.pid, seconds, periods))
            runs[name]["scorecam_alone"] = asyncio.run(scorecam_alone(url, process.pid, seconds))
        finally:
            process.terminate()
            process.wait(timeout=60)
        print(name, json.dumps(runs[name]), flush=True)
    least = min(run["server_cores"] for run in runs.values())
    alone = [run["scorecam_alone"] for run in runs.values()]
    per_core = max(each["maps_per_min"] / each["server_cores"] for each in alone)
    left = max(0.0, runs["default"]["scorecam_alone"]["server_cores"] - least)
    runs["scorecam_max_maps_per_min"] = round(per_core * left, 2)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="a checkout of the code to compare with (its service/ is used)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the loaded window per server")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--short-heavy", action="store_true", help="add a client looping short heavy work (faithfulness scores)"
    )
    parser.add_argument(
        "--bound", action="store_true", help="this tree: the Score-CAM throughput left when the cheap targets hold"
    )
    args = parser.parse_args()
    if args.bound and not args.before:
        parser.error("--bound compares with --before's Score-CAM throughput under the mixed load")
    here = Path(__file__).resolve().parent.parent
    trees = {"this": here} | ({"before": args.before.resolve()} if args.before else {})
    results: dict[str, dict] = {}
    if args.bound:
        results["this"] = bound(here, args.seconds)
        trees.pop("this")
    for name, tree in trees.items():
        process = spawn(PORT, {"PYTHONPATH": str(tree / "service")}, "cpu", cwd=tree)  # that tree's camserve
        try:
            background = BACKGROUND | (SHORT_HEAVY if args.short_heavy else {})
            results[name] = asyncio.run(measure(f"http://127.0.0.1:{PORT}", args.seconds, background))
        finally:
            process.terminate()
            process.wait(timeout=60)
        print(name, json.dumps(results[name]), flush=True)
    if args.bound:
        before = results["before"]["loaded"]["scorecam_maps_per_min_by_latency"]
        results["scorecam_throughput_ratio_at_most"] = round(results["this"]["scorecam_max_maps_per_min"] / before, 2)
    elif "before" in results:
        before = results["before"]["loaded"]["scorecam_maps_per_min"]
        results["scorecam_throughput_ratio"] = round(results["this"]["loaded"]["scorecam_maps_per_min"] / before, 2)
    results["machine"] = f"{os.cpu_count()} CPUs; {' '.join(sys.argv)}"
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
