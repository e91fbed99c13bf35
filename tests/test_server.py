"""A real `camserve serve` process on a free port: readiness, answers, graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import jpeg_bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    port = free_port()
    env = {**os.environ, "CAMSERVE_DEVICE": "cpu", "CAMSERVE_MAX_BATCH_SIZE": "1", "CAMSERVE_LOG_LEVEL": "warning"}
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            pytest.fail(f"server exited early: {process.stdout.read().decode()}")
        time.sleep(0.2)
    else:
        process.kill()
        pytest.fail("server did not become ready in 120 s")
    yield process, url
    if process.poll() is None:
        process.kill()
    process.wait(10)


def test_real_server_answers_and_sigterm_loses_no_accepted_request(server, chelsea):
    process, url = server
    photo = jpeg_bytes(chelsea)
    first = httpx.post(f"{url}/predict", content=photo, headers={"content-type": "image/jpeg"}, timeout=60)
    assert first.status_code == 200 and first.json()["results"][0]["predictions"][0]["label"] == "Egyptian cat"

    def explain(_: int) -> int:
        response = httpx.post(
            f"{url}/explain?method=guided-gradcam", content=photo, headers={"content-type": "image/jpeg"}, timeout=120
        )
        return response.status_code

    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(explain, i) for i in range(12)]
        time.sleep(1.0)  # all 12 connections are accepted and queued (batch size 1: they run one by one)
        process.send_signal(signal.SIGTERM)
        statuses = [f.result() for f in futures]
    assert statuses == [200] * 12
    # uvicorn re-raises the signal after its graceful shutdown: exit status 143 / -SIGTERM, as is customary
    assert process.wait(60) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health/live", timeout=2)


def test_cli_client_commands_against_a_real_server(server, chelsea, tmp_path, capsys):
    from service.cli import main

    _process, url = server
    image = tmp_path / "chelsea.jpg"
    image.write_bytes(jpeg_bytes(chelsea))
    assert main(["predict", str(image), "--url", url, "--top-k", "2"]) == 0
    table = capsys.readouterr().out
    assert "chelsea.jpg (451x300" in table and "Egyptian cat" in table
    out = tmp_path / "out"
    assert main(["explain", str(image), "--url", url, "--method", "gradcam", "--out", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["chelsea_gradcam_285_heatmap.png", "chelsea_gradcam_285_overlay.png"]
    from PIL import Image

    assert Image.open(out / written[1]).size == (451, 300)
    assert main(["explain", str(image), "--url", url, "--method", "scorecam", "--out", str(out)]) == 1
    assert "server answered 422: unknown CAM method 'scorecam'" in capsys.readouterr().err


def test_client_that_disconnects_has_its_waiting_items_dropped(registry, chelsea, monkeypatch):
    """A real uvicorn (in a thread, so compute can be slowed): abandoned items never reach compute."""
    import threading

    import uvicorn

    from service.api import create_app
    from service.settings import Settings
    from service.worker import BatchWorker

    seen: list[int] = []
    original = BatchWorker.compute

    def slow(self, batch):
        seen.append(len(batch))
        time.sleep(1.0)
        return original(self, batch)

    monkeypatch.setattr(BatchWorker, "compute", slow)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = uvicorn.Server(
        uvicorn.Config(create_app(Settings(max_batch_size=1), registry=registry), port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        photo = jpeg_bytes(chelsea)

        def post(timeout: float):
            return httpx.post(f"{url}/predict", content=photo, headers={"content-type": "image/jpeg"}, timeout=timeout)

        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(post, 30)
            time.sleep(0.2)
            quitters = [pool.submit(post, 0.3) for _ in range(3)]
            for quitter in quitters:
                with pytest.raises(httpx.ReadTimeout):
                    quitter.result()
            assert first.result().status_code == 200
        time.sleep(1.5)
        metrics_text = httpx.get(f"{url}/metrics").text
        assert seen == [1]  # only the first request's image was computed
        assert 'camserve_inference_items_total{model="efficientnet-lite0"} 1.0' in metrics_text
    finally:
        server.should_exit = True
        thread.join(10)
