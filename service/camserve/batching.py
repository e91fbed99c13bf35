"""A bounded batching queue that knows nothing of what it batches, and the one thread that runs torch.

`BatchQueue` takes payloads, hands each caller a future, and calls an injected batch function with up to
`max_batch_size` payloads at a time on the `TorchThread`, so many clients share one forward pass. With `stage`
and `overlap`, under a backlog the next batch is staged on another thread while the current one computes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from camserve.errors import NotReadyError, OverloadedError

log = logging.getLogger(__name__)

P = TypeVar("P")  # what one item carries
R = TypeVar("R")  # what the batch function gives one item

BatchFunction = Callable[[list[P], list[Any] | None], list["R | BaseException"]]
BatchObserver = Callable[[str, int, float], None]


class TorchThread:
    """The one thread that runs every parallel torch operation of the process (loading, compute).

    On CPU, once a second thread has run parallel torch operations, every OpenMP-parallel op in the
    process gets about 2.5x slower (measured: EfficientNet-Lite0 forward 19 ms on one thread, 50 ms
    after a second thread ran one). Keeping all torch work on one thread avoids that; on a GPU one
    thread also keeps kernel launches ordered. The app makes one and hands it to whatever runs torch.
    """

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="camserve-torch")

    async def run(self, function: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    def close(self) -> None:
        self.executor.shutdown(wait=False)


@dataclass
class _Entry(Generic[P, R]):
    payload: P
    future: asyncio.Future[R]
    enqueued: float = field(default_factory=time.perf_counter)


class BatchQueue(Generic[P, R]):
    """Bounded queue + batches computed on the torch thread by `compute(payloads, staged)`, which returns one
    result or exception per payload (in order). Payloads whose caller gave up are never computed."""

    def __init__(
        self,
        name: str,
        compute: BatchFunction,
        thread: TorchThread,
        *,
        max_batch_size: int,
        max_queue: int,
        max_wait_ms: float = 0.0,
        stage: Callable[[list[P]], list[Any]] | None = None,
        overlap: bool = False,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_wait_s = max_wait_ms / 1000.0
        self._compute = compute
        self._stage = stage
        self._overlap = overlap and stage is not None
        self._on_batch = on_batch
        self._thread = thread
        self._pending: deque[_Entry[P, R]] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._computing = 0
        self._staged_items = 0

    @property
    def in_flight(self) -> int:
        """Items in the batch being computed now, and in the next one while it is staged."""
        return self._computing + self._staged_items

    @property
    def depth(self) -> int:
        """Items waiting (not yet computing)."""
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"queue-{self.name}")

    def submit(self, payloads: list[P]) -> list[asyncio.Future[R]]:
        """Enqueue all payloads of one request, or none of them when the queue is full; one future each."""
        if self._closing:
            raise NotReadyError("the service is shutting down; retry on another instance")
        if len(self._pending) + len(payloads) > self.max_queue:
            raise OverloadedError(
                f"model {self.name!r} is overloaded: {len(self._pending)} images are queued "
                f"(limit {self.max_queue}); retry shortly",
                retry_after_s=1,
            )
        loop = asyncio.get_running_loop()
        entries = [_Entry(payload, loop.create_future()) for payload in payloads]
        self._pending.extend(entries)
        self._idle.clear()
        self._wakeup.set()
        return [entry.future for entry in entries]

    async def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new items, finish what is queued, stop."""
        self._closing = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        except TimeoutError:
            log.warning("queue %s: %d items unfinished at shutdown", self.name, len(self._pending))
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        ahead: tuple[list[_Entry[P, R]], asyncio.Future[list[Any]]] | None = None
        while True:
            if ahead is not None:
                (batch, staging), ahead = ahead, None
                try:
                    staged: list[Any] | None = await staging
                except Exception:  # staging is an optimisation: the batch then runs as it is
                    log.exception("queue %s: staging a batch failed", self.name)
                    staged = None
                self._staged_items = 0
            else:
                if not self._pending:
                    self._idle.set()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if self.max_wait_s and len(self._pending) < self.max_batch_size:
                    await self._hold_for_more()
                batch, staged = self._take_batch(), None
            if not batch:
                continue
            started = time.perf_counter()
            self._computing = len(batch)
            payloads = [entry.payload for entry in batch]
            computing = self._thread.run(self._compute, payloads, staged)
            if self._overlap and len(self._pending) >= self.max_batch_size:  # a full next batch waits anyway
                following = self._take_batch()
                self._staged_items = len(following)
                assert self._stage is not None
                ahead = (following, loop.run_in_executor(None, self._stage, [e.payload for e in following]))
            try:
                outputs: list[Any] = await computing
            except Exception as exc:  # the batch function should answer per item; if it raised, all fail
                log.exception("queue %s: batch of %d failed", self.name, len(batch))
                outputs = [exc] * len(batch)
            finally:
                self._computing = 0
            if self._on_batch is not None:
                self._on_batch(self.name, len(batch), time.perf_counter() - started)
            for entry, output in zip(batch, outputs, strict=True):
                if entry.future.done():
                    continue
                if isinstance(output, BaseException):
                    entry.future.set_exception(output)
                else:
                    entry.future.set_result(output)

    async def _hold_for_more(self) -> None:
        deadline = self._pending[0].enqueued + self.max_wait_s
        while len(self._pending) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Entry[P, R]]:
        """Up to max_batch_size live entries; entries whose caller gave up are dropped here."""
        batch: list[_Entry[P, R]] = []
        while self._pending and len(batch) < self.max_batch_size:
            entry = self._pending.popleft()
            if not entry.future.done():
                batch.append(entry)
        return batch
