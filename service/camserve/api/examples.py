"""Example values for the OpenAPI document that the service really accepts, so that generated clients and
fuzzers (schemathesis) that send the documented examples send valid requests."""

from __future__ import annotations

# A real 24x16 JPEG (393 bytes): skimage's "chelsea" cat, downscaled. Classified, explained like any photo.
JPEG_BASE64 = (
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAA0JCgsKCA0LCgsODg0PEyAVExISEyccHhcgLikxMC4pLSwzOko+MzZGNywtQFdBRkxOUlNSMj5a"
    "YVpQYEpRUk//2wBDAQ4ODhMREyYVFSZPNS01T09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT0//wAAR"
    "CAAQABgDASIAAhEBAxEB/8QAFwABAQEBAAAAAAAAAAAAAAAAAAQCA//EACEQAAEDBAMAAwAAAAAAAAAAAAECAxEABBIhEzGBIjJR/8QAFQEB"
    "AQAAAAAAAAAAAAAAAAAAAwT/xAAYEQEBAQEBAAAAAAAAAAAAAAABACECEf/aAAwDAQACEQMRAD8Aw+pK33nGUq4VHS5idaAqW2bReNq7QW14"
    "nIddmq2bbktm3cTifskGPRXB3Jp6WvlnKFJM9RpXlRvtaBHWkXdo24kLdZBjSCfaVbbW7ctcgWJOjliCI/KU3JkS7f/Z"
)

BASE64_STRING = {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/*"}
"""JSON schema of a base64-encoded image file (JSON Schema 2020-12 / OpenAPI 3.1 `contentEncoding`)."""
