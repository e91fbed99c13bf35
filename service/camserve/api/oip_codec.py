"""The Open Inference Protocol v2 wire format, as pure functions (no HTTP server, no model): request bodies
(gzip/deflate framing, the binary tensor data extension's JSON header and binary section), BYTES tensors (JSON
base64 elements or 4-byte little-endian length-prefixed binary elements), and the response body.

Errors are camserve.errors exceptions, mapped to statuses by camserve.api.errors: InvalidInputError (400),
PayloadTooLargeError (413), UnsupportedMediaError (415).
"""

from __future__ import annotations

import base64
import json
import math
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from camserve.api.inputs import decode_base64
from camserve.api.schemas_v2 import INPUT, V2RequestInput
from camserve.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaError
from camserve.numbers import whole_number

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_MEDIA_TYPE = "application/octet-stream"
JSON_MEDIA_TYPE = "application/json"


@dataclass(frozen=True)
class OutputTensor:
    """One response output: `array` row-major; BYTES arrays hold `bytes` objects; `binary` sends it as binary data."""

    name: str
    datatype: str  # FP32, INT64 or BYTES
    array: np.ndarray
    binary: bool = False


# -- request bodies ---------------------------------------------------------------------------
def split_body(body: bytes, headers: Mapping[str, str], max_bytes: int) -> tuple[bytes, bytes]:
    """The JSON header and the binary section (empty without the extension), decompressed if it was.
    `headers` are looked up by lower-case name. Without Inference-Header-Content-Length, an
    application/octet-stream body that is not JSON (its first non-blank byte is not `{`) is one encoded image
    file: the result is the binary request that sends it as the one element of `images`."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("gzip", "deflate"):
        body = inflate(body, encoding, max_bytes)
    elif encoding not in ("", "identity"):
        raise UnsupportedMediaError(f"unsupported Content-Encoding {encoding!r}; send gzip, deflate or identity")
    length = headers.get(HEADER_LENGTH.lower())
    if length is None:
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media == BINARY_MEDIA_TYPE and body.strip() and not body.lstrip().startswith(b"{"):
            return one_file_request(body)
        return body, b""
    size = whole_number(length)
    if size is None or size > len(body):
        raise InvalidInputError(f"{HEADER_LENGTH} {length!r} is not a length within the body of {len(body)} bytes")
    return body[:size], body[size:]


def one_file_request(data: bytes) -> tuple[bytes, bytes]:
    """The JSON header and binary section of a request whose one input `images` is [data]."""
    blob = pack_bytes([data])
    tensor = {"name": INPUT, "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}
    header = {"inputs": [tensor]}
    return json.dumps(header, separators=(",", ":")).encode(), blob


def inflate(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """A gzip (one or more members) or deflate body, decompressed to at most `max_bytes`; 400 when it is cut
    off, corrupt or followed by other bytes, 413 when it inflates beyond the limit."""
    parts: list[bytes] = []
    size, rest = 0, body
    while True:
        inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            part = inflater.decompress(rest, max_bytes + 1 - size)
        except zlib.error as exc:
            raise InvalidInputError(f"the {encoding} request body cannot be decompressed: {exc}") from None
        size += len(part)
        if size > max_bytes or inflater.unconsumed_tail:
            raise PayloadTooLargeError(f"the decompressed request body exceeds {max_bytes} bytes")
        if not inflater.eof:
            raise InvalidInputError(f"the {encoding} request body is cut off")
        parts.append(part)
        rest = inflater.unused_data
        if not rest:
            return b"".join(parts)
        if encoding != "gzip" or not rest.startswith(b"\x1f\x8b"):  # only gzip chains members
            raise InvalidInputError(f"the {encoding} request body has bytes after its end")


# -- BYTES tensors ----------------------------------------------------------------------------
def input_files(inputs: Sequence[V2RequestInput], binary: bytes, max_files: int) -> list[bytes]:
    """The encoded files of the one BYTES input `images`, from JSON `data` (base64) or from the binary section;
    400 for any other input, datatype or shape, 413 beyond `max_files`."""
    if len(inputs) != 1 or inputs[0].name != INPUT:
        names = [i.name for i in inputs]
        raise InvalidInputError(f"expected one input named {INPUT!r} (BYTES: encoded image files), got {names}")
    tensor = inputs[0]
    if tensor.datatype != "BYTES":
        raise InvalidInputError(f"input {INPUT!r} must be BYTES (encoded image files), got {tensor.datatype}")
    if any(d < 0 for d in tensor.shape):
        raise InvalidInputError(f"input {INPUT!r} has a negative dimension in its shape {tensor.shape}")
    count = math.prod(tensor.shape)
    if count > max_files:
        raise PayloadTooLargeError(f"{count} images in one request; the limit is {max_files}")
    parameters = tensor.parameters or {}
    if any(key.startswith("shared_memory") for key in parameters):
        raise InvalidInputError("shared memory inputs are not supported: send the data in the request")
    size = parameters.get("binary_data_size")
    if size is None:
        if binary:
            raise InvalidInputError(f"{len(binary)} bytes of binary data follow the header but no input claims them")
        if tensor.data is None:
            raise InvalidInputError(f"input {INPUT!r} has neither `data` nor the `binary_data_size` parameter")
        values = flatten(tensor.data)
        if len(values) != count:
            raise InvalidInputError(
                f"input {INPUT!r} has {len(values)} elements; its shape {tensor.shape} says {count}"
            )
        where = f"inputs[0].data[{{}}] ({INPUT!r})"
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise InvalidInputError(f"{where.format(i)} must be a string: a base64-encoded image file")
        return [decode_base64(value, where.format(i)) for i, value in enumerate(values)]
    if tensor.data is not None:
        raise InvalidInputError(f"input {INPUT!r} has both `data` and `binary_data_size`")
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise InvalidInputError(
            f"input {INPUT!r} says binary_data_size {size!r}; {len(binary)} bytes follow the JSON header"
        )
    return unpack_bytes(binary, count)


def flatten(data: list[Any]) -> list[Any]:
    """Nested lists in row-major order, flat."""
    flat: list[Any] = []
    for value in data:
        flat.extend(flatten(value) if isinstance(value, list) else [value])
    return flat


def unpack_bytes(binary: bytes, count: int, name: str = INPUT) -> list[bytes]:
    """A serialized BYTES tensor of `count` elements: per element a 4-byte little-endian length, then that many
    bytes; 400 when it ends early or bytes are left over."""
    elements, offset = [], 0
    for i in range(count):
        if offset + 4 > len(binary):
            raise InvalidInputError(f"the binary data of {name!r} ends before element {i} of {count}")
        (length,) = struct.unpack_from("<I", binary, offset)
        offset += 4
        if offset + length > len(binary):
            raise InvalidInputError(f"element {i} of {name!r} says {length} bytes; fewer follow")
        elements.append(binary[offset : offset + length])
        offset += length
    if offset != len(binary):
        raise InvalidInputError(f"{len(binary) - offset} bytes left over after the {count} elements of {name!r}")
    return elements


def pack_bytes(elements: Iterable[bytes]) -> bytes:
    """The binary form of a BYTES tensor: each element's 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(value)) + value for value in elements)


def serialize(array: np.ndarray, datatype: str) -> bytes:
    """A tensor's binary data: BYTES as pack_bytes, FP32 and INT64 little-endian, row-major."""
    if datatype == "BYTES":
        return pack_bytes(array.ravel())
    return array.astype("<f4" if datatype == "FP32" else "<i8").tobytes()


# -- the response -----------------------------------------------------------------------------
def encode_response(
    model: str,
    version: str,
    request_id: str | None,
    outputs: Iterable[OutputTensor],
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or (when any output is binary) the JSON header, then each binary
    output's data in order, with Content-Type application/octet-stream and Inference-Header-Content-Length."""
    entries, blobs = [], []
    for output in outputs:
        array = output.array
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(array.shape)}
        if output.binary:
            blob = serialize(array, output.datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif output.datatype == "BYTES":
            entry["data"] = [base64.b64encode(value).decode("ascii") for value in array.ravel()]
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    body: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": entries}
    if request_id is not None:
        body["id"] = request_id
    if parameters:
        body["parameters"] = parameters
    header = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": JSON_MEDIA_TYPE}
    return header + b"".join(blobs), {"content-type": BINARY_MEDIA_TYPE, HEADER_LENGTH: str(len(header))}
