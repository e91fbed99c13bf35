"""Let idle OpenMP threads sleep instead of spinning, so the server's other threads get the cores.

torch runs its CPU kernels on OpenMP threads which, by default, spin for a while after each parallel
region waiting for the next one. In the server the model shares the cores with the threads that decode
images, resize them for the model, render heatmaps and encode PNGs, and a spinning thread takes its core
from them (measured on 2 vCPUs: +25-55 % requests/s on 1080p photos; see docs/benchmarks.md).
`OMP_WAIT_POLICY=PASSIVE` makes waiting threads sleep. The OpenMP runtime reads it once, when torch is
first imported, so `prefer_passive_waiting` must run before that.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
"""OpenMP settings that decide how waiting threads behave; if the operator set any, camserve leaves them."""


def prefer_passive_waiting() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE for this process (and its children); returns whether it will take effect.

    Does nothing when the operator set one of `WAIT_VARIABLES`, or when torch is already imported (its
    OpenMP runtime has read the environment by then).
    """
    if any(name in os.environ for name in WAIT_VARIABLES):
        return False
    if "torch" in sys.modules:
        log.warning("torch was imported before camserve could set OMP_WAIT_POLICY; idle OpenMP threads will spin")
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
