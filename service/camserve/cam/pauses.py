"""Points where a long computation lets other work run: `pause()` between chunks of extra forwards.

The engine calls `pause()` before each chunk of reruns (Score-CAM's masked forwards, Ablation-CAM's ablated
suffixes, faithfulness' perturbed inputs). Whoever runs such work can install, for its own thread, what happens
there (`pausing(callback)`), e.g. computing cheap requests that arrived meanwhile; without one, nothing happens.
A callback never pauses itself: `pause()` inside it does nothing. No hook, autograd recording or capture is active
at these points, so the callback may run any engine call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_local = threading.local()


def pause() -> None:
    """Run this thread's pause callback, if any (not re-entered)."""
    callback = getattr(_local, "callback", None)
    if callback is None:
        return
    _local.callback = None
    try:
        callback()
    finally:
        _local.callback = callback


@contextmanager
def pausing(callback: Callable[[], None]) -> Iterator[None]:
    """Within this block, `pause()` on this thread runs `callback`."""
    previous = getattr(_local, "callback", None)
    _local.callback = callback
    try:
        yield
    finally:
        _local.callback = previous
