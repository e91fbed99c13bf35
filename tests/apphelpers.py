"""Helpers to run the real app in-process with its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from service.api import create_app
from service.settings import Settings


@asynccontextmanager
async def running_app(registry, **settings) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    """Start the app (lifespan included), wait until models are in place, yield a client and the app."""
    app = create_app(Settings(**settings), registry=registry)
    async with app.router.lifespan_context(app):
        await app.state.loaded.wait()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://camserve", timeout=120) as client:
            yield client, app
