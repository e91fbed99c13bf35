"""Let idle OpenMP threads stop spinning soon, so the server's other threads get the cores.

torch runs its CPU kernels on OpenMP threads (GNU libgomp in torch's Linux wheels) which, by default,
spin through 300,000 iterations (milliseconds) after each parallel region, waiting for the next one. In
the server the model shares the cores with the threads that decode images, render heatmaps and encode
PNGs, and a spinning thread takes its core from them. `GOMP_SPINCOUNT=30000` keeps threads spinning
through the short gaps between the regions of one forward pass but lets them sleep through longer ones.
Measured on 2 vCPUs against the default and against never spinning (`OMP_WAIT_POLICY=PASSIVE`), see
docs/benchmarks.md. libgomp reads the variable once, when torch is first imported, so
`limit_openmp_spinning` must run before that.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

SPIN_COUNT = "30000"
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
"""OpenMP settings that decide how waiting threads behave; if the operator set any, camserve leaves them."""


def limit_openmp_spinning() -> bool:
    """Set GOMP_SPINCOUNT for this process (and its children); returns whether it will take effect.

    Does nothing when the operator set one of `WAIT_VARIABLES`, or when torch is already imported (its
    OpenMP runtime has read the environment by then).
    """
    if any(name in os.environ for name in WAIT_VARIABLES):
        return False
    if "torch" in sys.modules:
        log.warning("torch was imported before camserve could set GOMP_SPINCOUNT; idle OpenMP threads will spin")
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True
