"""Make docs/images/overlays.png: Grad-CAM and Grad-CAM++ overlays the service produced on real photos.

.venv/bin/python -m bench.readme_figure docs/images/overlays.png
"""

from __future__ import annotations

import asyncio
import base64
import io
import sys
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw
from skimage import data

from camserve.api import create_app
from camserve.settings import Settings

PHOTOS = {"chelsea": data.chelsea, "coffee": data.coffee, "astronaut": data.astronaut, "rocket": data.rocket}
METHODS = ("gradcam", "gradcampp")
TILE = 240


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _tile(image: Image.Image, caption: str) -> Image.Image:
    image = image.convert("RGB")
    image.thumbnail((TILE, TILE))
    canvas = Image.new("RGB", (TILE, image.height + 22), "white")
    canvas.paste(image, ((TILE - image.width) // 2, 0))
    ImageDraw.Draw(canvas).text((4, image.height + 4), caption, fill="black")
    return canvas


async def collect() -> list[list[Image.Image]]:
    app = create_app(Settings(device="cpu"))
    rows = []
    async with app.router.lifespan_context(app):
        await app.state.loaded.wait()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://camserve", timeout=300) as client:
            for name, load in PHOTOS.items():
                photo = load()
                row = [_tile(Image.fromarray(photo), name)]
                for method in METHODS:
                    response = await client.post(
                        f"/explain?method={method}&overlay=true&colormap=jet",
                        content=_jpeg(photo),
                        headers={"content-type": "image/jpeg"},
                    )
                    response.raise_for_status()
                    explanation = response.json()["results"][0]["explanations"][0]
                    overlay = Image.open(io.BytesIO(base64.b64decode(explanation["overlay"])))
                    row.append(_tile(overlay, f"{method}: {explanation['label']} ({explanation['score']:.2f})"))
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0] if args else "docs/images/overlays.png")
    rows = asyncio.run(collect())
    heights = [max(tile.height for tile in row) for row in rows]
    sheet = Image.new("RGB", (TILE * len(rows[0]), sum(heights)), "white")
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            sheet.paste(tile, (c * TILE, sum(heights[:r])))
    target.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(target, optimize=True)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
