"""The explorer page: `GET /` and its static files under `/explorer/`, shipped inside the package.

The page is plain HTML, CSS and ES modules with no external resources, so it works offline, in the container and
behind the API key (the files themselves need no key: the page asks for one when `/models` answers 401).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response

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
async def page(request: Request) -> Response:
    """The page for a browser (Accept names text/html); otherwise, as KServe's v1 root answers its SDK's
    `is_server_live` (Accept `*/*`), liveness as JSON: 200 `{"status": "alive"}`, or 503 `{"detail": reason}`
    once the device failed (as `/health/live`). Both vary by Accept."""
    if _wants_html(request.headers.get("accept", "")):
        response = _serve("index.html")
    else:
        lifecycle = request.app.state.lifecycle
        alive = lifecycle.is_alive
        body = {"status": "alive"} if alive else {"detail": lifecycle.not_ready_reason()}
        response = JSONResponse(body, status_code=200 if alive else 503)
    response.headers["Vary"] = "Accept"
    return response


def _wants_html(accept: str) -> bool:
    """Whether an Accept header names text/html (or XHTML) with a quality above 0."""
    for item in accept.split(","):
        media, *params = (part.strip().lower() for part in item.split(";"))
        if media in ("text/html", "application/xhtml+xml"):
            return not any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params)
    return False


@router.get("/explorer/{name}")
async def asset(name: str) -> Response:
    return _serve(name)
