"""The uvicorn server with a drain phase: SIGTERM first takes the instance out of rotation, then stops it.

Kubernetes sends SIGTERM and removes the pod from its endpoints at the same time; load balancers and
kube-proxy take a few seconds to notice. Plain uvicorn closes its listening socket at once, so the
requests routed here in those seconds are refused. This server instead:

1. on SIGTERM marks the lifecycle draining (`/health/ready` answers 503) and keeps accepting and
   serving requests for `drain_s` seconds;
2. then does uvicorn's graceful shutdown: stop accepting, finish every accepted request, run the
   app's shutdown (the workers finish their queues);
3. exits with status 0 (uvicorn would re-raise the signal, exit status 143).

SIGINT (Ctrl-C), a second SIGTERM, or `drain_s` = 0 skip the drain and go straight to step 2.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from camserve.lifecycle import Lifecycle

log = logging.getLogger("camserve")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM drains for `drain_s` seconds before the graceful shutdown."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_s: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_s = drain_s
        self.stop_accepting_at: float | None = None  # time.monotonic() at which the drain ends

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.lifecycle.drain()
        if sig == signal.SIGTERM and self.drain_s > 0 and self.stop_accepting_at is None:
            self.stop_accepting_at = time.monotonic() + self.drain_s
            log.info("SIGTERM: still accepting requests for %.1f s, then finishing and exiting", self.drain_s)
            return
        # uvicorn's own handling, minus recording the signal (which it would re-raise at exit)
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        """Called by uvicorn's main loop every 0.1 s; True stops the server."""
        if self.stop_accepting_at is not None and time.monotonic() >= self.stop_accepting_at:
            self.should_exit = True
        return await super().on_tick(counter)
