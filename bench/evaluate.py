"""Explanation quality of every method on an evaluation set with known object boxes.

    .venv/bin/python -m bench.evaluate --out docs/evaluation.json

The set is built from shipped real photos: objects cut from scikit-image's chelsea (cat) and coffee
(espresso cup) pasted at known, seeded positions on real textures (brick, grass, gravel), one, two or
three instances per image; plus imgaug's quokka photo with its annotated box when imgaug's data files
are installed (`pip install imgaug`, read without importing it). Metrics: pointing game (15 px),
energy-based pointing game, Average Drop / Increase in Confidence, deletion / insertion AUC and, for
multi-instance images, how much of each instance the map covers (normalized map >= 0.5).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from skimage import data

from camserve.cam import METHOD_NAMES, CamEngine, metrics
from camserve.cam.render import heatmaps
from camserve.models import ModelSpec, load_model

SIZE = 224
OBJECTS = {  # name: (photo, crop rows, crop cols, ImageNet class)
    "cat": (data.chelsea, (0, 300), (60, 400), 285),  # Egyptian cat
    "cup": (data.coffee, (0, 380), (40, 500), 967),  # espresso
}
TEXTURES = {"brick": data.brick, "grass": data.grass, "gravel": data.gravel}
SIDES = {1: 120, 2: 96, 3: 80}


@dataclass
class Scene:
    name: str
    pixels: torch.Tensor  # float [3, SIZE, SIZE] in [0, 1]
    masks: list[torch.Tensor]  # one bool [SIZE, SIZE] mask per instance
    target: int | None  # ImageNet class, None = the model's top-1


def _resize(array: np.ndarray, height: int, width: int) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(array)).float().div(255)
    x = x.permute(2, 0, 1)[None] if x.dim() == 3 else x[None, None].expand(1, 3, -1, -1)
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]


def _place(rng: np.random.Generator, count: int, side: int) -> list[tuple[int, int]]:
    """Top-left corners of `count` non-overlapping side x side squares inside the canvas."""
    for _ in range(10_000):
        corners = [(int(rng.integers(0, SIZE - side)), int(rng.integers(0, SIZE - side))) for _ in range(count)]
        if all(
            abs(a[0] - b[0]) >= side or abs(a[1] - b[1]) >= side
            for i, a in enumerate(corners)
            for b in corners[i + 1 :]
        ):
            return corners
    raise RuntimeError("could not place the objects")


def build_scenes(seeds: int) -> list[Scene]:
    scenes = []
    for texture_name, texture in TEXTURES.items():
        background = texture()
        for object_name, (photo, rows, cols, cls) in OBJECTS.items():
            patch = photo()[rows[0] : rows[1], cols[0] : cols[1]]
            for count, side in SIDES.items():
                for seed in range(seeds):
                    rng = np.random.default_rng(zlib.crc32(f"{texture_name}/{object_name}/{count}/{seed}".encode()))
                    top, left = rng.integers(0, background.shape[0] - SIZE), rng.integers(0, background.shape[1] - SIZE)
                    canvas = _resize(background[top : top + SIZE, left : left + SIZE], SIZE, SIZE).clone()
                    obj = _resize(patch, side, side)
                    masks = []
                    for y, x in _place(rng, count, side):
                        canvas[:, y : y + side, x : x + side] = obj
                        masks.append(metrics.box_to_mask((x, y, x + side, y + side), SIZE, SIZE))
                    scenes.append(Scene(f"{object_name}x{count}-{texture_name}-{seed}", canvas, masks, cls))
    quokka = _quokka()
    if quokka is not None:
        scenes.append(quokka)
    return scenes


def _quokka() -> Scene | None:
    spec = importlib.util.find_spec("imgaug")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    from PIL import Image

    photo = np.asarray(Image.open(folder / "quokka.jpg").convert("RGB"))
    box = json.loads((folder / "quokka_annotations.json").read_text())["bounding_boxes"][0]
    height, width = photo.shape[:2]
    sy, sx = SIZE / height, SIZE / width
    mask = metrics.box_to_mask((box["x1"] * sx, box["y1"] * sy, box["x2"] * sx, box["y2"] * sy), SIZE, SIZE)
    return Scene("quokka", _resize(photo, SIZE, SIZE), [mask], None)


def evaluate(
    engine: CamEngine,
    scenes: list[Scene],
    mean,
    std,
    pixels_per_step: int,
    layers: list[str] | None = None,
    methods: tuple[str, ...] = METHOD_NAMES,
) -> dict:
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    inputs = (torch.stack([s.pixels for s in scenes]) - mean_t) / std_t
    logits = engine.predict(inputs)
    classes = torch.tensor(
        [s.target if s.target is not None else int(logits[i].argmax()) for i, s in enumerate(scenes)]
    )

    def score_fn(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(engine.predict(x), dim=1)

    results = {}
    for method in methods:
        started = time.perf_counter()
        explanation = engine.explain(inputs, [[int(c)] for c in classes], method=method, layers=layers)
        saliency = heatmaps(explanation.maps, (SIZE, SIZE)).cpu()
        union = [torch.stack(s.masks).any(0) for s in scenes]
        hits = [metrics.pointing_game_hit(saliency[i], union[i]) for i in range(len(scenes))]
        energy = [metrics.energy_pointing_game(saliency[i], union[i]) for i in range(len(scenes))]
        drop, increase = metrics.average_drop_increase(score_fn, inputs, saliency, classes, mean, std)
        deletion, insertion = metrics.deletion_insertion_auc(
            score_fn, inputs, saliency, classes, pixels_per_step=pixels_per_step
        )
        coverage: dict[int, list[float]] = {2: [], 3: []}
        all_covered: dict[int, list[bool]] = {2: [], 3: []}
        for i, scene in enumerate(scenes):
            if len(scene.masks) > 1:
                per_instance = metrics.instance_coverage(saliency[i], scene.masks)
                coverage[len(scene.masks)].extend(per_instance)
                all_covered[len(scene.masks)].append(min(per_instance) >= 0.25)
        by_class: dict[str, list[bool]] = {}
        for scene, hit in zip(scenes, hits, strict=True):
            by_class.setdefault(scene.name.split("x")[0].split("-")[0], []).append(hit)
        results[method] = {
            "pointing_game": metrics.pointing_game_accuracy(by_class),
            "energy_pointing_game": statistics.mean(energy),
            "average_drop": drop,
            "increase_in_confidence": increase,
            "deletion_auc": float(deletion.mean()),
            "insertion_auc": float(insertion.mean()),
            "coverage_2": statistics.mean(coverage[2]) if coverage[2] else None,
            "coverage_3": statistics.mean(coverage[3]) if coverage[3] else None,
            "all_instances_covered_2": statistics.mean(all_covered[2]) if all_covered[2] else None,
            "all_instances_covered_3": statistics.mean(all_covered[3]) if all_covered[3] else None,
            "seconds": time.perf_counter() - started,
        }
        print(f"{method}: {results[method]}", flush=True)
    return {"classes": classes.tolist(), "methods": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3, help="scenes per (texture, object, count)")
    parser.add_argument("--pixels-per-step", type=int, default=224 * 8, help="deletion/insertion step")
    parser.add_argument("--layer", action="append", default=None, help="target layer(s); default: the model's")
    parser.add_argument("--method", action="append", default=None, help="method(s) to evaluate; default: all")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    served = load_model(ModelSpec(name="efficientnet-lite0"), torch.device("cpu"), warmup=False)
    scenes = build_scenes(args.seeds)
    print(f"{len(scenes)} scenes ({sum(len(s.masks) > 1 for s in scenes)} with several instances)", flush=True)
    methods = tuple(args.method or METHOD_NAMES)
    report = evaluate(served.engine, scenes, served.mean, served.std, args.pixels_per_step, args.layer, methods)
    report.update(
        scenes=len(scenes),
        multi_instance=sum(len(s.masks) > 1 for s in scenes),
        seeds=args.seeds,
        pixels_per_step=args.pixels_per_step,
        layers=args.layer or [served.default_layer],
        quokka=any(s.name == "quokka" for s in scenes),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    header = (
        "| method | pointing game ↑ | energy PG ↑ | avg drop % ↓ | increase % ↑ | deletion AUC ↓ | insertion AUC ↑ "
        "| coverage ×2 ↑ | coverage ×3 ↑ | all covered ×2 / ×3 ↑ |"
    )
    print(header)
    print("| --- " * 10 + "|")
    for method, r in report["methods"].items():
        print(
            f"| {method} | {r['pointing_game']:.3f} | {r['energy_pointing_game']:.3f} | {r['average_drop']:.1f} | "
            f"{r['increase_in_confidence']:.1f} | {r['deletion_auc']:.3f} | {r['insertion_auc']:.3f} | "
            f"{r['coverage_2']:.3f} | {r['coverage_3']:.3f} | "
            f"{r['all_instances_covered_2']:.2f} / {r['all_instances_covered_3']:.2f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
