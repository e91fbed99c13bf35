"""A real `camserve serve` process on a free port: readiness, answers, graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.apphelpers import free_port, start_server, stop


@pytest.fixture
def server():
    process, url = start_server()
    yield process, url
    stop(process)


def test_sigterm_drains_then_exits_0_losing_no_request(cat_jpeg):
    """The Kubernetes contract: readiness 503 at once; requests in flight and requests still routed here during
    the drain (3 s here) are all answered; then it stops accepting, finishes, and exits 0."""
    process, url = start_server(CAMSERVE_DRAIN_S="3")
    photo = cat_jpeg

    def post(path: str) -> int:
        response = httpx.post(f"{url}{path}", content=photo, headers={"content-type": "image/jpeg"}, timeout=120)
        return response.status_code

    try:
        first = httpx.post(f"{url}/predict", content=photo, headers={"content-type": "image/jpeg"}, timeout=60)
        assert first.status_code == 200 and first.json()["results"][0]["predictions"][0]["label"] == "Egyptian cat"
        with ThreadPoolExecutor(32) as pool:  # a thread for every request: each is sent when submitted
            in_flight = [pool.submit(post, "/explain?method=guided-gradcam") for _ in range(12)]
            time.sleep(1.0)  # all 12 connections are accepted and queued (batch size 1: they run one by one)
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            not_ready_after = None
            while time.monotonic() - signalled < 2.0:
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 503:
                    not_ready_after = time.monotonic() - signalled
                    break
                time.sleep(0.05)
            during_drain = []
            while time.monotonic() - signalled < 2.5:  # each on a new connection, as kube-proxy would open
                during_drain.append(pool.submit(post, "/predict"))
                time.sleep(0.4)
            live_while_draining = httpx.get(f"{url}/health/live", timeout=2).status_code
            in_flight_statuses = [f.result() for f in in_flight]
            drain_statuses = [f.result() for f in during_drain]
        assert not_ready_after is not None and not_ready_after < 1.0
        assert live_while_draining == 200
        assert in_flight_statuses == [200] * 12
        assert len(drain_statuses) >= 4 and drain_statuses == [200] * len(drain_statuses)
        assert process.wait(60) == 0
        assert time.monotonic() - signalled >= 3.0  # it kept accepting for the whole drain
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health/live", timeout=2)
    finally:
        stop(process)


def test_sigterm_without_drain_stops_accepting_at_once_and_finishes_accepted_requests(cat_jpeg):
    process, url = start_server(CAMSERVE_DRAIN_S="0")
    photo = cat_jpeg

    def explain(_: int) -> int:
        response = httpx.post(
            f"{url}/explain?method=guided-gradcam", content=photo, headers={"content-type": "image/jpeg"}, timeout=60
        )
        return response.status_code

    try:
        with ThreadPoolExecutor(8) as pool:
            in_flight = [pool.submit(explain, i) for i in range(8)]  # one by one: 1 s or more in all
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            refused_after = None
            while refused_after is None and time.monotonic() - signalled < 5.0:
                try:
                    httpx.get(f"{url}/health/live", timeout=1)
                    time.sleep(0.05)
                except httpx.ConnectError:
                    refused_after = time.monotonic() - signalled
            statuses = [f.result() for f in in_flight]
        assert refused_after is not None and refused_after < 1.0
        assert statuses == [200] * 8
        assert process.wait(30) == 0
    finally:
        stop(process)


def test_cli_client_commands_against_a_real_server(server, cat_jpeg, tmp_path, capsys):
    from camserve.cli import main

    _process, url = server
    image = tmp_path / "chelsea.jpg"
    image.write_bytes(cat_jpeg)
    assert main(["predict", str(image), "--url", url, "--top-k", "2"]) == 0
    table = capsys.readouterr().out
    assert "chelsea.jpg (451x300" in table and "Egyptian cat" in table
    out = tmp_path / "out"
    assert main(["explain", str(image), "--url", url, "--method", "gradcam", "--out", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["chelsea_gradcam_285_heatmap.png", "chelsea_gradcam_285_overlay.png"]
    from PIL import Image

    assert Image.open(out / written[1]).size == (451, 300)
    assert main(["explain", str(image), "--url", url, "--method", "smoothgradcam", "--out", str(out)]) == 1
    assert "server answered 422: method: unknown CAM method 'smoothgradcam'" in capsys.readouterr().err


def test_client_that_disconnects_has_its_waiting_items_dropped(registry, cat_jpeg, monkeypatch):
    """A real uvicorn (in a thread, so compute can be slowed): abandoned items never reach compute."""
    import threading

    import uvicorn

    from camserve.api import create_app
    from camserve.batches import ModelBatches
    from camserve.settings import Settings

    seen: list[int] = []
    original = ModelBatches.compute

    def slow(self, batch, *staged):
        seen.append(len(batch))
        time.sleep(1.0)
        return original(self, batch, *staged)

    monkeypatch.setattr(ModelBatches, "compute", slow)
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
        photo = cat_jpeg

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


@pytest.mark.parametrize("stop_by", ["sigterm", "port taken"])
def test_stopped_while_loading_it_exits_at_once_without_waiting_for_the_load(tmp_path, stop_by):
    """A pod terminated (or failing to bind) during a long model load or compile exits in seconds, not when the
    load on the torch thread would have finished."""
    models = tmp_path / "models.toml"
    models.write_text(
        '[[models]]\nname = "slow"\nkind = "entrypoint"\nentrypoint = "tests.fixtures.tiny_models:slow_classifier"\n'
    )
    port = free_port()
    taken = socket.socket()
    if stop_by == "port taken":
        taken.bind(("127.0.0.1", port))
        taken.listen()
    env = {**os.environ, "CAMSERVE_DEVICE": "cpu", "CAMSERVE_MODELS_FILE": str(models), "CAMSERVE_RUNTIME": "eager"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "camserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        if stop_by == "sigterm":
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # listening, models still loading
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            assert httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 503
            process.send_signal(signal.SIGTERM)
        code = process.wait(20)
        output = process.stdout.read().decode()
    finally:
        stop(process)
        taken.close()
    assert time.monotonic() - started < 30  # the load alone takes 60 s
    assert "stopped while the models were still loading" in output
    assert code == (0 if stop_by == "sigterm" else 3), output  # 3: uvicorn's start-up failure
