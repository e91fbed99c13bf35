"""Helpers to run the real app: in-process with its lifespan, as uvicorn in a thread, or as a `camserve serve`
process on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import httpx
import pytest

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(**env: str) -> tuple[subprocess.Popen, str]:
    """`camserve serve` on a free port (CPU, batch size 1), once ready; `env` adds CAMSERVE_* variables."""
    port = free_port()
    env = {
        **os.environ,
        "CAMSERVE_DEVICE": "cpu",
        "CAMSERVE_MAX_BATCH_SIZE": "1",
        "CAMSERVE_LOG_LEVEL": "warning",
        **env,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "camserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            pytest.fail(f"server exited early: {process.stdout.read().decode()}")
        time.sleep(0.2)
    process.kill()
    pytest.fail("server did not become ready in 120 s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(10)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample's values over series matching the labels."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
