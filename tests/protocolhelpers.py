"""What the protocol tests (KServe v1, Open Inference Protocol v2, and both) share: the model's name, request
builders for each protocol, and /explain's answer to compare against."""

from __future__ import annotations

import base64
import io
import json
import struct

import httpx
import numpy as np
from PIL import Image

try:
    import tritonclient.http as tritonclient_http
except ImportError:  # the test extras bring it; without them only the tritonclient tests skip
    tritonclient_http = None

MODEL = "efficientnet-lite0"
EGYPTIAN_CAT, TABBY = 285, 281


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def explain_reference(live: str, photo: bytes) -> dict:
    """/explain's answer for Grad-CAM of two classes, raw maps included."""
    response = httpx.post(
        f"{live}/explain",
        params=[("method", "gradcam"), ("target", str(EGYPTIAN_CAT)), ("target", "tabby"), ("raw", "true")],
        content=photo,
        headers={"content-type": "image/jpeg"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def images_input(photos: list[bytes], binary: bool):
    tensor = tritonclient_http.InferInput("images", [len(photos)], "BYTES")
    values = photos if binary else [b64(p) for p in photos]
    tensor.set_data_from_numpy(np.array(values, dtype=object), binary_data=binary)
    return tensor


def binary_request(elements: list[bytes], **header_fields) -> tuple[bytes, dict[str, str]]:
    """A binary tensor data request body (JSON header + serialized BYTES tensor) and its headers."""
    blob = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    header = {
        "inputs": [
            {
                "name": "images",
                "shape": [len(elements)],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(blob)},
            }
        ],
        **header_fields,
    }
    text = json.dumps(header).encode()
    return text + blob, {"Inference-Header-Content-Length": str(len(text)), "content-type": "application/octet-stream"}
