"""The explorer page: `GET /` and its static files under `/explorer/`, shipped inside the package.

The page is plain HTML, CSS and ES modules with no external resources, so it works offline, in the container and
behind the API key (the files themselves need no key: the page asks for one when `/models` answers 401).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

router = APIRouter(include_in_schema=False)

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Only this origin: no CDN, no external fonts or scripts; heatmaps are decoded from blobs and data URLs.
_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new release's page never runs an old script
}


@lru_cache(maxsize=1)
def static_files() -> dict[str, bytes]:
    """The explorer's files by name, read once from the package."""
    folder = resources.files("camserve") / "static" / "explorer"
    return {
        item.name: item.read_bytes()
        for item in folder.iterdir()
        if item.is_file() and any(item.name.endswith(suffix) for suffix in _MEDIA_TYPES)
    }


def _serve(name: str) -> Response:
    body = static_files().get(name)
    if body is None:
        raise HTTPException(status_code=404, detail=f"no explorer file {name!r}")
    media_type = _MEDIA_TYPES[name[name.rindex(".") :]]
    return Response(body, media_type=media_type, headers=_HEADERS)


@router.get("/")
async def page() -> Response:
    return _serve("index.html")


@router.get("/explorer/{name}")
async def asset(name: str) -> Response:
    return _serve(name)
