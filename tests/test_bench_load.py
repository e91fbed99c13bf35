"""The load benchmark's measuring parts against the real app: counters, segments, table."""

from __future__ import annotations

import pytest

from bench.bench_load import Segment, load_segment, markdown, server_counters
from tests.apphelpers import running_app
from tests.conftest import jpeg_bytes

pytestmark = pytest.mark.anyio


async def test_a_load_segment_counts_what_the_server_computed(registry, chelsea, coffee):
    photos = [jpeg_bytes(chelsea), jpeg_bytes(coffee)]
    async with running_app(registry, max_batch_size=8) as (client, _app):
        before = server_counters((await client.get("/metrics")).text)
        segment = await load_segment(client, "/predict", photos, concurrency=4, duration=1.0)
        after = server_counters((await client.get("/metrics")).text)
        bad = await load_segment(client, "/explain?method=nope", photos, concurrency=2, duration=0.3)
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
