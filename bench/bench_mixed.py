"""Mixed load: does a cheap request stay cheap beside someone else's Score-CAM? (issue: fair under mixed load)

    git worktree add /tmp/before <commit before the scheduler>
    .venv/bin/python -m bench.bench_mixed --before /tmp/before --seconds 60 --json docs/bench_mixed_cpu.json

For each server (this tree, and `--before` if given; one at a time, each on the same port and photos):
`/predict` and Grad-CAM++ `/explain` alone (20 sequential requests each), then the same `/predict` loop for
`--seconds` while four other clients loop `/explain`: two Score-CAM, one Ablation-CAM, one Grad-CAM++ (224 px
photos, the embedded Lite0, default settings); with `--short-heavy`, a fifth client loops short heavy work
(Grad-CAM++ with faithfulness scores). Reports p50/p95 of each, the loaded/alone ratios, and Score-CAM maps per
minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="a checkout of the code to compare with (its service/ is used)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the loaded window per server")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--short-heavy", action="store_true", help="add a client looping short heavy work (faithfulness scores)"
    )
    args = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    trees = {"this": here} | ({"before": args.before.resolve()} if args.before else {})
    results: dict[str, dict] = {}
    for name, tree in trees.items():
        process = spawn(PORT, {"PYTHONPATH": str(tree / "service")}, "cpu", cwd=tree)  # that tree's camserve
        try:
            background = BACKGROUND | (SHORT_HEAVY if args.short_heavy else {})
            results[name] = asyncio.run(measure(f"http://127.0.0.1:{PORT}", args.seconds, background))
        finally:
            process.terminate()
            process.wait(timeout=60)
        print(name, json.dumps(results[name]), flush=True)
    if "before" in results:
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
