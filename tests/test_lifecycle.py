"""The lifecycle object and the draining server's signal handling (no sockets, no models)."""

from __future__ import annotations

import asyncio
import signal
import time

import uvicorn

from camserve.lifecycle import Lifecycle, Phase
from camserve.server import DrainingServer


def test_phases_and_the_reasons_readiness_gives():
    seen: list[Phase] = []
    lifecycle = Lifecycle(on_change=seen.append)
    assert not lifecycle.is_ready and lifecycle.not_ready_reason() == "models are loading"
    lifecycle.loaded()
    assert lifecycle.is_ready
    lifecycle.drain()
    lifecycle.drain()
    assert not lifecycle.is_ready and lifecycle.not_ready_reason() == "shutting down"
    assert seen == [Phase.READY, Phase.DRAINING]


def test_a_load_failure_is_kept_and_loading_after_a_drain_does_not_make_it_ready():
    failed = Lifecycle()
    failed.failed(RuntimeError("no weights"))
    assert failed.phase is Phase.FAILED and failed.not_ready_reason() == "model loading failed: no weights"
    draining = Lifecycle()
    draining.drain()
    draining.loaded()
    assert draining.phase is Phase.DRAINING


def server(drain_s: float) -> DrainingServer:
    return DrainingServer(uvicorn.Config(app=None), Lifecycle(), drain_s)


def test_sigterm_drains_first_and_a_second_sigterm_stops_accepting_at_once():
    draining = server(drain_s=0.3)
    draining.handle_exit(signal.SIGTERM, None)
    assert draining.lifecycle.phase is Phase.DRAINING and not draining.should_exit
    assert asyncio.run(draining.on_tick(1)) is False
    time.sleep(0.35)
    assert asyncio.run(draining.on_tick(2)) is True  # the drain is over: uvicorn's graceful shutdown begins
    assert draining._captured_signals == []  # nothing re-raised at exit: status 0

    impatient = server(drain_s=30)
    impatient.handle_exit(signal.SIGTERM, None)
    impatient.handle_exit(signal.SIGTERM, None)
    assert impatient.should_exit and not impatient.force_exit


def test_sigint_and_zero_drain_skip_the_drain():
    for sig, drain_s in ((signal.SIGINT, 30.0), (signal.SIGTERM, 0.0)):
        stopped = server(drain_s)
        stopped.handle_exit(sig, None)
        assert stopped.should_exit and stopped.lifecycle.phase is Phase.DRAINING
    twice = server(30.0)
    twice.handle_exit(signal.SIGINT, None)
    twice.handle_exit(signal.SIGINT, None)
    assert twice.force_exit
