"""The load benchmark's measuring parts against the real app: counters, segments, table."""

from __future__ import annotations

import asyncio

import pytest

from bench.bench_load import (
    RawHttpConnection,
    Segment,
    httpx_poster,
    load_segment,
    markdown,
    metrics_reader,
    server_counters,
)
from tests.apphelpers import running_app

pytestmark = pytest.mark.anyio


async def test_a_load_segment_counts_what_the_server_computed(registry, cat_jpeg, coffee_jpeg):
    photos = [cat_jpeg, coffee_jpeg]
    async with running_app(registry, max_batch_size=8) as (client, _app):
        metrics = metrics_reader(client)
        post = httpx_poster(client)
        before = server_counters(await metrics())
        segment = await load_segment(metrics, [post] * 4, "/predict", photos, duration=1.0)
        after = server_counters(await metrics())
        bad = await load_segment(metrics, [post] * 2, "/explain?method=nope", photos, duration=0.3)
    assert len(segment.latencies) >= 4 and not segment.errors
    assert segment.items == len(segment.latencies) == after[0] - before[0]
    assert 1 <= segment.batches <= segment.items and segment.batches == after[1] - before[1]
    assert 1.0 <= segment.mean_batch <= 4.0
    assert 0 < segment.compute_s < segment.elapsed * 1.5
    assert segment.throughput == pytest.approx(len(segment.latencies) / segment.elapsed)
    assert not bad.latencies and set(bad.errors) == {422} and bad.items == 0


def test_server_counters_sum_over_models_and_ignore_other_series():
    text = "\n".join(
        [
            'camserve_inference_items_total{model="a"} 10.0',
            'camserve_inference_items_total{model="b"} 6.0',
            'camserve_inference_executions_total{model="a"} 3.0',
            'camserve_inference_executions_total{model="b"} 2.0',
            'camserve_compute_seconds_sum{model="a"} 1.5',
            'camserve_compute_seconds_count{model="a"} 3.0',
            'camserve_inference_items_created{model="a"} 1.7e9',
        ]
    )
    assert server_counters(text) == (16.0, 5.0, 1.5)
    assert server_counters("") == (0.0, 0.0, 0.0)
    assert Segment(items=16.0, batches=5.0).mean_batch == 3.2 and Segment().mean_batch == 0.0


def test_markdown_table_shows_efficiency_and_its_rounds():
    row = {
        "endpoint": "/predict",
        "concurrency": 16,
        "throughput": 30.0,
        "p50_ms": 500.0,
        "p95_ms": 600.0,
        "p99_ms": 700.0,
        "mean_batch": 7.9,
        "errors": {},
        "engine_throughput": 33.3,
        "efficiency": 0.9,
        "round_efficiencies": [0.85, 0.9, 0.95],
        "server_busy": 0.99,
        "server_compute_ms_per_image": 31.0,
        "client_cpu_share": 0.07,
    }
    lines = markdown([row]).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[2].count("|")
    assert "| /predict | 16 | 30.0 | 500 | 600 | 700 | 7.9 | 0 | 33.3 | **0.90** (0.85/0.90/0.95) |" in lines[2]
    assert lines[2].endswith("| 0.99 | 31.0 | 7% |")


async def test_raw_connection_posts_keeps_alive_and_reconnects():
    """Against a small HTTP server: statuses, keep-alive, Connection: close, an idle connection the server
    dropped, and an answer it cannot frame."""
    seen: list[tuple[bytes, bytes]] = []
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            request_line = head.split(b"\r\n")[0]
            seen.append((request_line, body))
            if b"/busy" in request_line:
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")
            elif b"/bye" in request_line:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                await writer.drain()
                break
            elif b"/chunked" in request_line:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
            elif b"/drop" in request_line:
                break  # close without answering: what a server does to an idle keep-alive connection
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = RawHttpConnection(f"http://127.0.0.1:{port}")
    try:
        assert await connection.post("/a", b"jpeg-1") == 200
        assert await connection.post("/busy", b"jpeg-2") == 503
        assert connections == 1  # kept alive
        assert await connection.post("/bye", b"x") == 200
        assert await connection.post("/a", b"y") == 200 and connections == 2  # reopened after Connection: close
        with pytest.raises(ValueError, match="Content-Length"):
            await connection.post("/chunked", b"z")
        assert await connection.post("/a", b"after") == 200 and connections == 3
        first = len(seen)
        with pytest.raises(asyncio.IncompleteReadError):
            await connection.post("/drop", b"lost")
        dropped = [body for _, body in seen[first:]]
    finally:
        await connection.close()
        server.close()
        await server.wait_closed()
    assert dropped == [b"lost", b"lost"]  # a kept-alive connection that fails is retried once, fresh
    assert seen[0] == (b"POST /a HTTP/1.1", b"jpeg-1")
    assert [line for line, _ in seen[:4]] == [
        b"POST /a HTTP/1.1",
        b"POST /busy HTTP/1.1",
        b"POST /bye HTTP/1.1",
        b"POST /a HTTP/1.1",
    ]
