"""The mixed-load benchmark's measuring parts: CPU time read from /proc, closed-loop rates, paced clients."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest

from bench.bench_mixed import cpu_seconds, maps_per_min, paced, percentiles


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_seconds_counts_this_process_busy_time_and_not_its_sleep():
    before = cpu_seconds(os.getpid())
    time.sleep(0.3)
    slept = cpu_seconds(os.getpid()) - before
    started = time.process_time()
    while time.process_time() - started < 0.5:
        pass
    busy = cpu_seconds(os.getpid()) - before - slept
    assert slept < 0.1
    assert 0.4 <= busy <= 1.0


def test_maps_per_min_is_each_closed_loop_client_answering_once_per_mean_latency():
    assert maps_per_min([[6.0, 6.0], [3.0, 9.0], []]) == 20.0  # 10 + 10; a client with no answer adds nothing


def test_percentiles_report_the_median_and_the_95th_of_the_sorted_values():
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert percentiles(values) == {"n": 100, "p50_ms": 50.5, "p95_ms": 95.0}


class _Client:
    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.sent: list[float] = []

    async def post(self, path: str, content: bytes, headers: dict[str, str]) -> _Response:
        self.sent.append(time.perf_counter())
        await asyncio.sleep(self.latency)
        return _Response()


class _Response:
    def raise_for_status(self) -> None:
        return None


def test_a_paced_client_sends_one_request_per_period_and_never_two_at_once():
    fast, slow = _Client(0.01), _Client(0.15)
    out_fast: list[float] = []
    out_slow: list[float] = []

    async def run() -> None:
        until = time.perf_counter() + 0.5
        await asyncio.gather(
            paced(fast, "/p", [b"x"], 0.1, until, out_fast),  # type: ignore[arg-type]
            paced(slow, "/p", [b"x"], 0.1, until, out_slow),  # type: ignore[arg-type]
        )

    asyncio.run(run())
    gaps = [b - a for a, b in zip(fast.sent, fast.sent[1:], strict=False)]
    assert 4 <= len(fast.sent) <= 6 and all(0.09 <= gap <= 0.2 for gap in gaps)  # waits out the period
    slow_gaps = [b - a for a, b in zip(slow.sent, slow.sent[1:], strict=False)]
    assert all(gap >= 0.15 for gap in slow_gaps)  # answered late: the next one follows the answer
    assert len(out_fast) == len(fast.sent) and len(out_slow) == len(slow.sent)
