"""The A/B benchmark's bookkeeping: alternation, medians, per-round ratios, errors."""

from __future__ import annotations

import argparse

import pytest

from bench import ab_servers
from bench.bench_load import Segment, parse_size

pytestmark = pytest.mark.anyio


async def test_compare_alternates_and_takes_median_ratios(monkeypatch):
    calls: list[tuple[str, float]] = []
    speeds = {"A": iter([0, 10, 20, 12]), "B": iter([0, 15, 20, 24])}  # a warm-up each, then 3 rounds

    async def drive(url, path, photos, concurrency, seconds):
        calls.append((url, seconds))
        n = next(speeds[url])
        return Segment(latencies=[0.1] * n, errors={503: 1} if url == "B" else {}, elapsed=1.0)

    monkeypatch.setattr(ab_servers, "drive", drive)
    monkeypatch.setattr(ab_servers, "jpegs", lambda size: [b"jpeg"])
    args = argparse.Namespace(a="A", b="B", path="/predict", photo_size=None, concurrency=4, rounds=3, seconds=2.0)
    result = await ab_servers.compare(args)
    assert [url for url, _ in calls] == ["A", "B", "A", "B", "A", "B", "A", "B"]
    assert [s for _, s in calls[2:]] == [2.0] * 6
    assert result["rounds"] == [(10.0, 15.0), (20.0, 20.0), (12.0, 24.0)]
    assert result["a_images_per_s"] == 12.0 and result["b_images_per_s"] == 20.0
    assert result["b_over_a"] == 1.5  # median of 1.5, 1.0, 2.0
    assert result["errors"] == {"a": 0, "b": 3}


def test_parse_size():
    assert parse_size("1920x1080") == (1920, 1080) and parse_size("64X48") == (64, 48)
    with pytest.raises(ValueError):
        parse_size("large")
