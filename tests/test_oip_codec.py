"""The Open Inference Protocol v2 wire format (camserve.api.oip_codec) without an HTTP server: gzip framing, the
binary tensor data extension, BYTES tensors and the response body."""

from __future__ import annotations

import base64
import gzip
import json
import struct
import zlib

import numpy as np
import pytest

from camserve.api import oip_codec
from camserve.api.oip_codec import HEADER_LENGTH, OutputTensor
from camserve.api.schemas_v2 import V2RequestInput
from camserve.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaError

LIMIT = 1 << 20
PNG = b"\x89PNG\r\n\x1a\nnot really"


def binary_body(elements: list[bytes]) -> tuple[bytes, dict[str, str], bytes, bytes]:
    """A binary request body, its headers (lower-case names, as Starlette gives them), its JSON header and blob."""
    blob = oip_codec.pack_bytes(elements)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": [len(elements)],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    return header + blob, {HEADER_LENGTH.lower(): str(len(header))}, header, blob


def images_input(**fields) -> V2RequestInput:
    return V2RequestInput.model_validate({"name": "images", "shape": [1], "datatype": "BYTES", **fields})


# -- request bodies ---------------------------------------------------------------------------
def test_a_json_body_without_the_header_is_all_header():
    assert oip_codec.split_body(b'{"inputs": []}', {}, LIMIT) == (b'{"inputs": []}', b"")


def test_the_header_length_splits_the_body_into_json_and_binary():
    body, headers, header, blob = binary_body([b"abc", b"de"])
    assert oip_codec.split_body(body, headers, LIMIT) == (header, blob)


def test_gzip_and_deflate_bodies_round_trip_and_gzip_members_chain():
    body, headers, header, blob = binary_body([b"abc"])
    for encoding, packed in (
        ("gzip", gzip.compress(body)),
        ("deflate", zlib.compress(body)),
        ("gzip", gzip.compress(body[:10]) + gzip.compress(body[10:])),  # as `cat a.gz b.gz` makes
    ):
        assert oip_codec.split_body(packed, {**headers, "content-encoding": encoding}, LIMIT) == (header, blob)


def test_a_cut_off_gzip_body_is_a_400_saying_so():
    with pytest.raises(InvalidInputError, match="^the gzip request body is cut off$"):
        oip_codec.inflate(gzip.compress(b"x" * 1000)[:-4], "gzip", LIMIT)


def test_bytes_after_the_end_of_a_gzip_or_deflate_body_are_a_400():
    with pytest.raises(InvalidInputError, match="^the gzip request body has bytes after its end$"):
        oip_codec.inflate(gzip.compress(b"x") + b"junk", "gzip", LIMIT)
    with pytest.raises(InvalidInputError, match="^the deflate request body has bytes after its end$"):
        oip_codec.inflate(zlib.compress(b"x") + zlib.compress(b"y"), "deflate", LIMIT)  # deflate has no members


def test_a_corrupt_body_is_a_400_and_one_inflating_beyond_the_limit_a_413():
    with pytest.raises(InvalidInputError, match="^the gzip request body cannot be decompressed: "):
        oip_codec.inflate(b"\x1f\x8bnot gzip at all", "gzip", LIMIT)
    with pytest.raises(PayloadTooLargeError, match="^the decompressed request body exceeds 1000 bytes$"):
        oip_codec.inflate(gzip.compress(b"\0" * 1001), "gzip", 1000)
    assert oip_codec.inflate(gzip.compress(b"\0" * 1000), "gzip", 1000) == b"\0" * 1000


def test_an_unknown_content_encoding_is_a_415_naming_it():
    with pytest.raises(UnsupportedMediaError, match="^unsupported Content-Encoding 'br'; send gzip, deflate or"):
        oip_codec.split_body(b"{}", {"content-encoding": "br"}, LIMIT)


def test_a_header_length_beyond_the_body_or_not_a_number_is_a_400():
    body, _, _, _ = binary_body([b"abc"])
    for length in (str(len(body) + 1), "-1", "\u00b2", "9" * 5000, "ten"):
        with pytest.raises(InvalidInputError, match=f"^{HEADER_LENGTH} .* is not a length within the body of"):
            oip_codec.split_body(body, {HEADER_LENGTH.lower(): length}, LIMIT)
    assert oip_codec.split_body(body, {HEADER_LENGTH.lower(): str(len(body))}, LIMIT) == (body, b"")


def test_an_octet_stream_body_without_the_header_is_one_image_file_unless_it_is_json():
    header, blob = oip_codec.split_body(PNG, {"content-type": "application/octet-stream"}, LIMIT)
    parsed = json.loads(header)
    assert parsed == {
        "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}]
    }
    assert oip_codec.input_files([images_input(**parsed["inputs"][0])], blob, 4) == [PNG]
    as_json = b' {"inputs": []}'
    assert oip_codec.split_body(as_json, {"content-type": "application/octet-stream"}, LIMIT) == (as_json, b"")
    assert oip_codec.split_body(b"", {"content-type": "application/octet-stream"}, LIMIT) == (b"", b"")
    assert oip_codec.split_body(PNG, {"content-type": "application/json"}, LIMIT) == (PNG, b"")


# -- BYTES tensors ----------------------------------------------------------------------------
def test_bytes_with_several_elements_round_trip_including_an_empty_one():
    elements = [b"first", b"", b"\x00\xff" * 300]
    packed = oip_codec.pack_bytes(elements)
    assert packed[:9] == struct.pack("<I", 5) + b"first"
    assert oip_codec.unpack_bytes(packed, 3) == elements


def test_bytes_that_end_early_or_leave_bytes_over_are_a_400():
    packed = oip_codec.pack_bytes([b"abc", b"de"])
    with pytest.raises(InvalidInputError, match="^the binary data of 'images' ends before element 2 of 3$"):
        oip_codec.unpack_bytes(packed, 3)
    with pytest.raises(InvalidInputError, match="^element 1 of 'images' says 2 bytes; fewer follow$"):
        oip_codec.unpack_bytes(packed[:-1], 2)
    with pytest.raises(InvalidInputError, match="^6 bytes left over after the 1 elements of 'images'$"):
        oip_codec.unpack_bytes(packed, 1)


def test_input_files_from_json_base64_nested_by_shape_or_from_binary_data():
    files = [b"one", b"two"]
    nested = images_input(shape=[2, 1], data=[[base64.b64encode(f).decode()] for f in files])
    assert oip_codec.input_files([nested], b"", 4) == files
    packed = oip_codec.pack_bytes(files)
    binary = images_input(shape=[2], parameters={"binary_data_size": len(packed)})
    assert oip_codec.input_files([binary], packed, 4) == files


@pytest.mark.parametrize(
    ("fields", "binary", "error"),
    [
        ({"name": "pixels"}, b"", InvalidInputError("expected one input named 'images' (BYTES: encoded image")),
        ({"datatype": "FP32"}, b"", InvalidInputError("input 'images' must be BYTES (encoded image files), got FP32")),
        ({"shape": [-1]}, b"", InvalidInputError("input 'images' has a negative dimension in its shape [-1]")),
        ({"shape": [5], "data": ["a"] * 5}, b"", PayloadTooLargeError("5 images in one request; the limit is 4")),
        ({"shape": [2], "data": ["aGk="]}, b"", InvalidInputError("input 'images' has 1 elements; its shape [2] says")),
        ({"data": [1]}, b"", InvalidInputError("inputs[0].data[0] ('images') must be a string: a base64-encoded")),
        ({}, b"", InvalidInputError("input 'images' has neither `data` nor the `binary_data_size` parameter")),
        ({"data": ["aGk="]}, b"xy", InvalidInputError("2 bytes of binary data follow the header but no input")),
        ({"parameters": {"binary_data_size": 3}}, b"xy", InvalidInputError("input 'images' says binary_data_size 3;")),
        ({"parameters": {"shared_memory_region": "r"}}, b"", InvalidInputError("shared memory inputs are not")),
    ],
)
def test_input_files_refuse_what_is_not_one_bytes_input_of_images(fields, binary, error):
    with pytest.raises(type(error)) as raised:
        oip_codec.input_files([images_input(**fields)], binary, 4)
    assert str(raised.value).startswith(str(error))


# -- the response -----------------------------------------------------------------------------
def test_a_response_without_binary_outputs_is_json_with_base64_bytes():
    probabilities = np.array([[0.25, 0.75]], dtype=np.float32)
    pictures = np.empty((1, 2), dtype=object)
    pictures[0, :] = [b"png0", b"png1"]
    body, headers = oip_codec.encode_response(
        "m",
        "1",
        "7",
        [OutputTensor("probabilities", "FP32", probabilities), OutputTensor("heatmap", "BYTES", pictures)],
    )
    assert headers == {"content-type": "application/json"}
    assert json.loads(body) == {
        "model_name": "m",
        "model_version": "1",
        "id": "7",
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]},
            {"name": "heatmap", "datatype": "BYTES", "shape": [1, 2], "data": ["cG5nMA==", "cG5nMQ=="]},
        ],
    }


def test_binary_outputs_follow_the_json_header_in_order_with_its_length_in_the_header():
    probabilities = np.array([[0.25, 0.75]], dtype=np.float32)
    classes = np.array([[285, 281]], dtype=np.int64)
    pictures = np.empty((1, 1), dtype=object)
    pictures[0, 0] = b"png"
    outputs = [
        OutputTensor("probabilities", "FP32", probabilities, binary=True),
        OutputTensor("explained_class", "INT64", classes),
        OutputTensor("heatmap", "BYTES", pictures, binary=True),
    ]
    body, headers = oip_codec.encode_response("m", "1", None, outputs)
    assert headers["content-type"] == "application/octet-stream"
    length = int(headers[HEADER_LENGTH])
    header = json.loads(body[:length])
    assert "id" not in header
    sizes = [o.get("parameters", {}).get("binary_data_size") for o in header["outputs"]]
    assert sizes == [8, None, 7] and header["outputs"][1]["data"] == [285, 281]
    rest = body[length:]
    assert np.frombuffer(rest[:8], dtype="<f4").tolist() == [0.25, 0.75]
    assert oip_codec.unpack_bytes(rest[8:], 1, "heatmap") == [b"png"]
    assert oip_codec.serialize(classes, "INT64") == struct.pack("<qq", 285, 281)
