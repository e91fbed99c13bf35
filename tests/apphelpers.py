"""Helpers to run the real app in-process with its lifespan."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import httpx

from camserve.api import create_app
from camserve.settings import Settings


@asynccontextmanager
async def running_app(registry, **settings) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    """Start the app (lifespan included), wait until models are in place, yield a client and the app."""
    app = create_app(Settings(**settings), registry=registry)
    async with app.router.lifespan_context(app):
        await app.state.loaded.wait()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://camserve", timeout=120) as client:
            yield client, app


@contextmanager
def live_server(registry, **settings) -> Iterator[str]:
    """A real uvicorn serving the app (with `registry`) on a free port, in a thread; yields its base URL."""
    import uvicorn

    from tests.test_server import free_port

    server = uvicorn.Server(
        uvicorn.Config(create_app(Settings(**settings), registry=registry), port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
