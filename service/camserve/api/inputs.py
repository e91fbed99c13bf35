"""Reading images from the three input forms: multipart, JSON with base64, raw image bytes."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from camserve import dicom
from camserve.api.schemas import JsonPredictRequest
from camserve.errors import InvalidInputError, InvalidParameterError, PayloadTooLargeError, UnsupportedMediaError
from camserve.options import describe_problems
from camserve.plan import ImagePayload

#: The JSON form's schema: JsonPredictRequest or one that extends it.
Form = TypeVar("Form", bound=JsonPredictRequest)

ACCEPTED = (
    "multipart/form-data (field 'image'), application/json ({\"images\": [base64, ...]}), image/* or "
    f"{dicom.MEDIA_TYPE}"
)


def media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower case ('' when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def parse_json(body: bytes, invalid: str) -> Any:
    """The JSON value of `body`; InvalidInputError '`invalid`: why' when it is not JSON, not UTF-8, nested too
    deeply, or holds a number of more than Python's 4300 digits."""
    try:
        return json.loads(body)
    except RecursionError:
        raise InvalidInputError(f"{invalid}: nested too deeply") from None
    except ValueError as exc:
        raise InvalidInputError(f"{invalid}: {exc}") from None


async def read_images(
    request: Request, max_images: int, schema: type[Form] = JsonPredictRequest
) -> tuple[list[ImagePayload], Form | None]:
    """The request's images and, for the JSON form, its parameters as `schema` reads them."""
    media = media_type(request)
    if media == "multipart/form-data":
        return await _multipart(request, max_images), None
    if media == "application/json":
        return _json(await request.body(), schema)
    if media.startswith("image/") or media in ("application/octet-stream", dicom.MEDIA_TYPE):
        body = await request.body()
        if not body:
            raise InvalidInputError("the request body is empty: send the image bytes")
        return [ImagePayload(body, media)], None
    if not media:
        raise UnsupportedMediaError(f"missing Content-Type; send {ACCEPTED}")
    raise UnsupportedMediaError(f"unsupported Content-Type {media!r}; send {ACCEPTED}")


async def _multipart(request: Request, max_images: int) -> list[ImagePayload]:
    try:
        form = await request.form(max_files=max_images, max_fields=64)
    except HTTPException as exc:
        if "too many files" in str(exc.detail).lower():
            detail = f"more than {max_images} images in one request; the limit is {max_images}"
            raise PayloadTooLargeError(detail) from None
        raise
    images: list[ImagePayload] = []
    for value in form.getlist("image"):
        if not isinstance(value, UploadFile):
            raise InvalidInputError("the multipart field 'image' must be a file upload, not a text value")
        images.append(ImagePayload(await value.read(), value.content_type))
    if not images:
        raise InvalidInputError(f"the multipart body has no 'image' file field (fields present: {list(form.keys())})")
    return images


def _json(body: bytes, schema: type[Form]) -> tuple[list[ImagePayload], Form]:
    raw = parse_json(body, "the JSON body is malformed")
    try:
        parsed = schema.model_validate(raw)
    except ValidationError as exc:
        raise InvalidParameterError(describe_problems(exc.errors())) from None
    return [ImagePayload(decode_base64(text, f"images[{i}]")) for i, text in enumerate(parsed.images)], parsed


def decode_base64(text: str, where: str) -> bytes:
    """The bytes of a base64 image (a data: URL accepted; whitespace ignored); `where` names it in errors."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError(f"{where} is not valid base64") from None
    if not data:
        raise InvalidInputError(f"{where} is empty")
    return data
