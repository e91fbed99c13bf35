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

    async def drive(url, path, photos, concurrency, seconds, per_request=1):
        calls.append((url, seconds))
        n = next(speeds[url])
        return Segment(latencies=[0.1] * n, errors={503: 1} if url == "B" else {}, elapsed=1.0)

    monkeypatch.setattr(ab_servers, "drive", drive)
    monkeypatch.setattr(ab_servers, "jpegs", lambda size: [b"jpeg"])
    args = argparse.Namespace(
        a="A", b="B", path="/predict", photo_size=None, concurrency=4, rounds=3, seconds=2.0, images_per_request=1
    )
    result = await ab_servers.compare(args)
    assert [url for url, _ in calls] == ["A", "B", "A", "B", "A", "B", "A", "B"]
    assert [s for _, s in calls[2:]] == [2.0] * 6
    assert result["rounds"] == [(10.0, 15.0), (20.0, 20.0), (12.0, 24.0)]
    assert result["a_images_per_s"] == 12.0 and result["b_images_per_s"] == 20.0
    assert result["b_over_a"] == 1.5  # median of 1.5, 1.0, 2.0
    assert result["errors"] == {"a": 0, "b": 3}


async def test_requests_of_several_photos_count_images(monkeypatch):
    """With --images-per-request 8 every request is one multipart body of 8 photos, and throughput counts images."""
    seen: list[int] = []

    async def drive(url, path, photos, concurrency, seconds, per_request=1):
        seen.append(per_request)
        return Segment(latencies=[0.1] * 5, elapsed=1.0)

    monkeypatch.setattr(ab_servers, "drive", drive)
    monkeypatch.setattr(ab_servers, "jpegs", lambda size: [b"jpeg"])
    args = argparse.Namespace(
        a="A", b="B", path="/predict", photo_size=None, concurrency=1, rounds=1, seconds=1.0, images_per_request=8
    )
    result = await ab_servers.compare(args)
    assert seen == [8] * 4 and result["a_images_per_s"] == 40.0 and result["images_per_request"] == 8


def test_multipart_bodies_hold_each_photo_as_an_image_field():
    from email.parser import BytesParser

    (body, _) = ab_servers.multipart([b"one", b"two"], 3)
    head = f"Content-Type: multipart/form-data; boundary={ab_servers.BOUNDARY}\r\n\r\n".encode()
    parts = BytesParser().parsebytes(head + body).get_payload()
    assert [p.get_param("name", header="content-disposition") for p in parts] == ["image"] * 3
    assert [p.get_payload(decode=True) for p in parts] == [b"one", b"two", b"one"]


def test_parse_size():
    assert parse_size("1920x1080") == (1920, 1080) and parse_size("64X48") == (64, 48)
    with pytest.raises(ValueError):
        parse_size("large")
