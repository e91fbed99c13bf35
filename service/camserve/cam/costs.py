"""What a rerun costs, in forward-equivalents: measured, not assumed.

Score-CAM and RISE rerun the whole network, one forward per masked input. Ablation-CAM and ReciproCAM rerun only
the network after the layer, whose cost is a fraction of a forward: at EfficientNet-Lite0's default layer (pooling
and the classifier) about 0.002 of an eager forward and 0.004 of an ONNX Runtime one. The scheduler counts work in
forward-equivalents, so a rerun of that part is counted as that fraction, measured once at start-up.
"""

from __future__ import annotations

import statistics
import time

from camserve.cam.family import LayerInput, Reruns

#: Fractions are kept within these bounds (timer resolution below; a suffix is never dearer than a forward above).
SMALLEST_FRACTION, LARGEST_FRACTION = 0.001, 1.0
#: Most rows and images one timing runs (a ViT-B forward of 8 images takes about 2 s on 2 cores).
MAX_ROWS, MAX_IMAGES = 256, 8


def suffix_fraction(layer: LayerInput, reruns: Reruns, repeats: int = 3) -> float:
    """Seconds per row through the network after `layer` over seconds per image of a whole forward, each on
    `reruns`' own path and at the size it runs at (rows: the suffix's chunk, at most `MAX_ROWS`; images: the rerun
    batch, at most `MAX_IMAGES`), median of `repeats` after one untimed call; within [0.001, 1]."""
    suffix = reruns.suffix(layer)
    rows, count = min(suffix.batch_size, MAX_ROWS), min(reruns.batch_size, MAX_IMAGES)
    copies = layer.activation[:1].expand(rows, *layer.activation.shape[1:]).clone()
    images = layer.images[:1].expand(count, *layer.images.shape[1:]).clone()
    after = _median_seconds(lambda: suffix(0, copies), repeats) / rows
    whole = _median_seconds(lambda: reruns.logits(images), repeats) / count
    return min(LARGEST_FRACTION, max(SMALLEST_FRACTION, after / whole))


def _median_seconds(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return max(statistics.median(times), 1e-9)
