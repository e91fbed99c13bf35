"""docs/images/multi_instance.png: Grad-CAM vs Grad-CAM++ vs LayerCAM on multi-instance scenes.

.venv/bin/python -m bench.evaluation_figure docs/images/multi_instance.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from bench.evaluate import build_scenes
from camserve.cam import render
from camserve.models import ModelSpec, load_model

PICKS = ("catx2-grass-0", "cupx3-brick-1", "catx3-gravel-2")
METHODS = ("gradcam", "gradcampp", "layercam")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0] if args else "docs/images/multi_instance.png")
    served = load_model(ModelSpec(name="efficientnet-lite0"), torch.device("cpu"), warmup=False)
    scenes = {s.name: s for s in build_scenes(3)}
    chosen = [scenes[name] for name in PICKS]
    pixels = torch.stack([s.pixels for s in chosen])
    inputs = (pixels - torch.tensor(served.mean).view(1, 3, 1, 1)) / torch.tensor(served.std).view(1, 3, 1, 1)
    tile = 224
    sheet = Image.new("RGB", (tile * (len(METHODS) + 1), (tile + 20) * len(chosen)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, scene in enumerate(chosen):
        y = row * (tile + 20)
        sheet.paste(Image.fromarray(render.to_uint8(scene.pixels).permute(1, 2, 0).numpy()), (0, y))
        draw.text((4, y + tile + 4), scene.name, fill="black")
        for col, method in enumerate(METHODS, start=1):
            maps = served.engine.explain(inputs[row : row + 1], [[scene.target]], method=method).maps
            heat = render.heatmaps(maps, (tile, tile))
            blended = render.blend(scene.pixels[None], render.colorize(heat), 0.5)
            picture = Image.fromarray(render.to_uint8(blended[0]).permute(1, 2, 0).numpy())
            boxes = ImageDraw.Draw(picture)
            for mask in scene.masks:
                ys, xs = torch.nonzero(mask, as_tuple=True)
                boxes.rectangle((int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())), outline="white")
            sheet.paste(picture, (col * tile, y))
            draw.text((col * tile + 4, y + tile + 4), method, fill="black")
    target.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(target, optimize=True)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
