"""A/B two running servers (e.g. two commits) under the same load, alternating so drift hits both alike.

    git worktree add /tmp/before <commit>
    (cd /tmp/before && ~-/.venv/bin/python -m camserve.cli serve --port 8123 &)    # A, this repo's venv
    .venv/bin/python -m camserve.cli serve --port 8124 &                            # B
    .venv/bin/python -m bench.ab_servers --a http://127.0.0.1:8123 --b http://127.0.0.1:8124 \\
        --path '/explain?method=gradcampp' --photo-size 1920x1080

Each round puts `--concurrency` closed-loop users on A, then on B, for `--seconds` each; the JSON it prints gives
both sides' median images/s over the rounds, and the median of the per-round ratios B/A.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics

from bench.bench_load import Segment, jpegs, load_segment, parse_size, raw_load

BOUNDARY = "camserve-ab-boundary"


def multipart(photos: list[bytes], count: int) -> list[bytes]:
    """Request bodies of `count` photos each (multipart `image` fields), one starting at each photo."""
    bodies = []
    for start in range(len(photos)):
        parts = []
        for i in range(count):
            head = (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{i}.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n"
            )
            parts.append(head.encode() + photos[(start + i) % len(photos)] + b"\r\n")
        bodies.append(b"".join(parts) + f"--{BOUNDARY}--\r\n".encode())
    return bodies


async def drive(
    url: str, path: str, photos: list[bytes], concurrency: int, seconds: float, per_request: int = 1
) -> Segment:
    async with raw_load(url, concurrency) as (metrics, posters):
        if per_request > 1:
            kind = f"multipart/form-data; boundary={BOUNDARY}"
            posters = [functools.partial(post.__self__.post, content_type=kind) for post in posters]  # type: ignore[attr-defined]
            photos = multipart(photos, per_request)
        return await load_segment(metrics, posters, path, photos, seconds)


async def compare(args: argparse.Namespace) -> dict:
    photos = jpegs(args.photo_size)
    run = functools.partial(drive, per_request=args.images_per_request)
    for url in (args.a, args.b):  # warm both
        await run(url, args.path, photos, args.concurrency, 3.0)
    rounds: list[tuple[float, float]] = []
    errors = {"a": 0, "b": 0}
    for _ in range(args.rounds):
        a = await run(args.a, args.path, photos, args.concurrency, args.seconds)
        b = await run(args.b, args.path, photos, args.concurrency, args.seconds)
        rounds.append((a.throughput * args.images_per_request, b.throughput * args.images_per_request))
        errors["a"] += sum(a.errors.values())
        errors["b"] += sum(b.errors.values())
    return {
        "path": args.path,
        "photo_size": args.photo_size,
        "concurrency": args.concurrency,
        "images_per_request": args.images_per_request,
        "a_images_per_s": statistics.median(r[0] for r in rounds),
        "b_images_per_s": statistics.median(r[1] for r in rounds),
        "b_over_a": statistics.median(r[1] / r[0] for r in rounds if r[0] > 0),
        "rounds": rounds,
        "errors": errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="base URL of server A")
    parser.add_argument("--b", required=True, help="base URL of server B")
    parser.add_argument("--path", default="/explain?method=gradcampp")
    parser.add_argument("--photo-size", type=parse_size, default=None, help="scale the photos to WxH")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--images-per-request", type=int, default=1, help="multipart requests of this many photos")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0, help="load per server per round")
    result = asyncio.run(compare(parser.parse_args()))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
