"""Picture encoding cost: a 1080p overlay as PNG vs JPEG vs WebP (and its heatmap as PNG), side by side.

    .venv/bin/python -m bench.bench_pictures --repeats 15

Uses the service's own rendering (`camserve.cam.render`) on a real photo (scikit-image astronaut) resized to
1920 x 1080 with a smooth synthetic map. Formats run interleaved within every repeat so machine noise hits
all of them alike; reports median milliseconds and bytes per format and the ratios to PNG.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
from PIL import Image
from skimage import data

from camserve.cam import render
from camserve.settings import Settings


def overlay_1080p() -> tuple[np.ndarray, np.ndarray]:
    """(RGB overlay [1080, 1920, 3], heatmap [1080, 1920]) as the service renders them."""
    photo = np.asarray(Image.fromarray(data.astronaut()).resize((1920, 1080), Image.Resampling.BILINEAR))
    ys, xs = np.mgrid[0:7, 0:7].astype(np.float32)
    cam = np.exp(-((ys - 2.5) ** 2 + (xs - 4.0) ** 2) / 4.0)
    heat = render.heatmap_image(cam, (1080, 1920))
    return render.overlay_image(photo, heat, "jet", 0.5), heat


def measure(repeats: int) -> dict[str, tuple[float, int]]:
    overlay, heat = overlay_1080p()
    level = Settings().png_compress_level
    contenders = {
        "overlay png": lambda: render.encode_picture(overlay, "png", level),
        "overlay jpeg": lambda: render.encode_picture(overlay, "jpeg", level),
        "overlay webp": lambda: render.encode_picture(overlay, "webp", level),
        "heatmap png": lambda: render.encode_png(heat, level),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    sizes: dict[str, int] = {}
    for _ in range(repeats):
        for name, encode in contenders.items():
            start = time.perf_counter()
            sizes[name] = len(encode())
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: (statistics.median(times[name]), sizes[name]) for name in contenders}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    results = measure(args.repeats)
    png_ms = results["overlay png"][0]
    print(f"{platform.processor() or platform.machine()}, {args.repeats} repeats, 1920 x 1080")
    print("| picture | median ms | bytes | PNG overlay ms / this |")
    print("| --- | ---: | ---: | ---: |")
    for name, (ms, size) in results.items():
        print(f"| {name} | {ms:.1f} | {size:,} | {png_ms / ms:.1f}× |")


if __name__ == "__main__":
    main()
