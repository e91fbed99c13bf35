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
#: Images of the timed forward; most rows of the timed suffix, and the time they may take (judged from two rows):
#: start-up stays short for a ViT-B (about 0.3 s per image on 2 cores) and per-call overhead is spread on a CNN.
IMAGES, MAX_ROWS, ROWS_BUDGET_S = 2, 256, 0.05


def suffix_fraction(layer: LayerInput, reruns: Reruns, repeats: int = 2) -> float:
    """Seconds per row through the network after `layer` over seconds per image of a whole forward, each on
    `reruns`' own paths (median of `repeats` after one untimed call), within [0.001, 1]. The forward runs on
    `IMAGES` images; the rows are as many as fit in `ROWS_BUDGET_S` (judged from two), at most the suffix's own
    chunk and `MAX_ROWS`, so that per-call overhead is not counted as work and a large model is timed briefly."""
    suffix = reruns.suffix(layer)
    images = layer.images[:1].expand(IMAGES, *layer.images.shape[1:]).clone()
    whole = _median_seconds(lambda: reruns.logits(images), repeats) / IMAGES
    copies = layer.activation[:1].expand(min(suffix.batch_size, MAX_ROWS), *layer.activation.shape[1:]).clone()
    per_row = _median_seconds(lambda: suffix(0, copies[:2]), 1) / 2
    rows = max(2, min(len(copies), int(ROWS_BUDGET_S / per_row)))
    after = _median_seconds(lambda: suffix(0, copies[:rows]), repeats) / rows
    return min(LARGEST_FRACTION, max(SMALLEST_FRACTION, after / whole))


def _median_seconds(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return max(statistics.median(times), 1e-9)
