"""The process's lifecycle: loading -> ready | failed, draining once shutdown begins, broken after a fatal
device error (readiness and liveness both fail, so the orchestrator restarts the process).

One object that `/health/ready`, the routes' service dependency and the SIGTERM drain all read and
write, so they cannot disagree about whether this instance should get traffic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum

log = logging.getLogger("camserve")


class Phase(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"
    BROKEN = "broken"


class Lifecycle:
    """Current phase plus the load error, if any. `on_change` is called with every new phase."""

    def __init__(self, on_change: Callable[[Phase], None] | None = None) -> None:
        self.phase = Phase.LOADING
        self.error: BaseException | None = None
        self.fault: BaseException | None = None
        self._on_change = on_change

    def loaded(self) -> None:
        """Models are loaded and warmed up (ignored once draining: readiness stays off)."""
        if self.phase is Phase.LOADING:
            self._set(Phase.READY)

    def failed(self, error: BaseException) -> None:
        """Model loading failed."""
        self.error = error
        if self.phase is Phase.LOADING:
            self._set(Phase.FAILED)

    def broken(self, fault: BaseException) -> None:
        """The device failed beyond repair (a sticky CUDA error): readiness and liveness fail from now on.
        Logged once; later calls are ignored."""
        if self.fault is not None:
            return
        self.fault = fault
        log.critical("device failure, readiness and liveness now answer 503 so this instance restarts: %s", fault)
        self._set(Phase.BROKEN)

    def drain(self) -> None:
        """Shutdown has begun: take this instance out of load balancing (idempotent; a broken one stays broken)."""
        if self.phase not in (Phase.DRAINING, Phase.BROKEN):
            log.info("draining: readiness now answers 503")
            self._set(Phase.DRAINING)

    @property
    def is_ready(self) -> bool:
        return self.phase is Phase.READY

    @property
    def is_alive(self) -> bool:
        """False once the device is broken: only a restart helps."""
        return self.fault is None

    def not_ready_reason(self) -> str:
        """Why readiness is off, in words for the 503 body."""
        if self.fault is not None:
            return f"the device failed and this instance needs a restart: {self.fault}"
        if self.phase is Phase.DRAINING:
            return "shutting down"
        if self.error is not None:
            return f"model loading failed: {self.error}"
        return "models are loading"

    def _set(self, phase: Phase) -> None:
        self.phase = phase
        if self._on_change is not None:
            self._on_change(phase)
