"""A bounded batching queue that knows nothing of what it batches, and the one thread that runs torch.

`BatchQueue` takes payloads, hands each caller a future, and calls an injected batch function with up to
`max_batch_size` payloads at a time on the `TorchThread`, so many clients share one forward pass. Each payload's
future resolves as soon as the batch function delivers it, not at the end of the batch.

Scheduling: two lanes. Cheap work (predictions, gradient methods) goes first. Heavy work (payloads that run
extra forwards in chunks) starts when no cheap work waits, or after a cheap batch when both wait, and at every chunk
boundary (`camserve.cam.pauses`) it lets one batch of cheap work that arrived meanwhile run first. So cheap work
never waits behind more than one chunk, and heavy work always gets one chunk per cheap batch: it cannot starve,
even under cheap work that never stops. A heavy batch that arrives while another runs joins it at its next pause,
and up to `MAX_HEAVY_TURNS` heavy batches then take turns chunk by chunk, round robin (`_Baton`), so heavy work
also waits behind at most one chunk of each other heavy batch, not behind whole Score-CAMs. Within a lane,
priority 1 (high) comes before 2 (normal, the default), before 3 (low).

Load is counted in work (the caller's cost per payload, e.g. forward-equivalents): `pending_work` for autoscaling,
`max_heavy_work` for refusing heavy work that would hold the thread for too long, and a measured rate for estimating
how long a new heavy payload would wait (`estimate_s`). With `stage` and `overlap`, under a backlog the next cheap
batch is staged on another thread while the current one computes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from camserve.cam.pauses import pausing
from camserve.errors import NotReadyError, OverloadedError

log = logging.getLogger(__name__)

P = TypeVar("P")  # what one item carries
R = TypeVar("R")  # what the batch function gives one item

Deliver = Callable[[int, Any], None]
BatchFunction = Callable[[list[P], list[Any] | None, Deliver], list[Any]]
BatchObserver = Callable[[str, int, float], None]
PRIORITIES = (1, 2, 3)  # high, normal, low
NORMAL = 2


class TorchThread:
    """The thread that runs the process's torch work (loading, compute): torch runs on one thread at a time, this
    one, or a heavy batch's turn (`_Baton`) while this one waits for it.

    On CPU, two threads running parallel torch operations at once slow every OpenMP-parallel op in the
    process about 2.5x (measured: EfficientNet-Lite0 forward 19 ms on one thread, 50 ms beside a second);
    handing the work from one thread to another, never both at once, measured no such slowdown. On a GPU one
    thread at a time also keeps kernel launches ordered. The app makes one and hands it to whatever runs torch.
    """

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="camserve-torch")

    async def run(self, function: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    def close(self) -> None:
        self.executor.shutdown(wait=False)


#: Heavy batches that take turns chunk by chunk; more wait in their lane until one of them is done.
MAX_HEAVY_TURNS = 4


class _Baton:
    """Heavy batches taking turns at their pauses, round robin, each on a thread of its own: only the first turn of
    the ring runs, the others wait at a pause (or for their start). So torch runs on one thread at a time, as on the
    `TorchThread` (measured: passing the work between threads this way costs no OpenMP slowdown; running two at
    once does)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._turns: deque[object] = deque()  # the one running first
        #: whether heavy batches may still join: only while the first one runs, so that the ring ends (the torch
        #: thread serves every model's queue, and it is busy until the ring is empty)
        self.open = True

    def __len__(self) -> int:
        return len(self._turns)

    def join(self) -> object:
        """A new turn at the back of the ring."""
        turn = object()
        with self._changed:
            self._turns.append(turn)
        return turn

    def wait(self, turn: object) -> None:
        """Until `turn` runs."""
        with self._changed:
            self._changed.wait_for(lambda: self._turns[0] is turn)

    def pass_on(self, turn: object) -> None:
        """The running `turn` goes to the back and waits until it runs again (at once when it is alone)."""
        with self._changed:
            if len(self._turns) > 1:
                self._turns.rotate(-1)
                self._changed.notify_all()
                self._changed.wait_for(lambda: self._turns[0] is turn)

    def leave(self, turn: object) -> None:
        """`turn` is done: the next one runs."""
        with self._changed:
            self._turns.remove(turn)
            self._changed.notify_all()

    def wait_empty(self) -> None:
        with self._changed:
            self._changed.wait_for(lambda: not self._turns)


@dataclass(eq=False)
class _Entry(Generic[P, R]):
    payload: P
    future: asyncio.Future[R]
    cost: int = 1
    heavy: bool = False
    priority: int = NORMAL
    enqueued: float = field(default_factory=time.perf_counter)
    settled: bool = False


class _Lane:
    """Entries waiting in one lane, by priority."""

    def __init__(self) -> None:
        self.waiting = {priority: deque[_Entry]() for priority in PRIORITIES}

    def __len__(self) -> int:
        return sum(len(d) for d in self.waiting.values())

    def oldest(self) -> float | None:
        return min((d[0].enqueued for d in self.waiting.values() if d), default=None)


class BatchQueue(Generic[P, R]):
    """Bounded two-lane queue + batches computed on the torch thread by `compute(payloads, staged, deliver)`.

    `compute` returns one result or exception per payload (in order) and may `deliver(index, result)` earlier;
    a payload is answered once, by whichever comes first. Payloads whose caller gave up are never computed."""

    def __init__(
        self,
        name: str,
        compute: BatchFunction,
        thread: TorchThread,
        *,
        max_batch_size: int,
        max_queue: int,
        max_wait_ms: float = 0.0,
        max_heavy_work: int | None = None,
        stage: Callable[[list[P]], list[Any]] | None = None,
        overlap: bool = False,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_heavy_work = max_heavy_work
        self._compute = compute
        self._stage = stage
        self._overlap = overlap and stage is not None
        self._on_batch = on_batch
        self._thread = thread
        self._lock = threading.Lock()  # lanes and work: the event loop submits, the torch thread takes at pauses
        self._cheap, self._heavy = _Lane(), _Lane()
        self._work = 0  # cost of everything queued or computing
        self._heavy_work = 0
        self._seconds_per_work: float | None = None  # measured on heavy batches
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._computing = 0
        self._staged_items = 0

    # -- what it holds -----------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Items in the batch being computed now, and in the next one while it is staged."""
        return self._computing + self._staged_items

    @property
    def depth(self) -> int:
        """Items waiting (not yet computing)."""
        return len(self._cheap) + len(self._heavy)

    @property
    def pending_work(self) -> int:
        """The cost of every item queued or computing (what an autoscaler should read)."""
        return self._work

    def estimate_s(self, cost: int) -> float | None:
        """Seconds until heavy work of `cost` queued now would be done, from the measured rate (None: unmeasured)."""
        if self._seconds_per_work is None:
            return None
        return (self._heavy_work + cost) * self._seconds_per_work

    # -- the event loop's side ---------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name=f"queue-{self.name}")

    def submit(
        self, payloads: list[P], *, costs: Sequence[int] | None = None, heavy: bool = False, priority: int = NORMAL
    ) -> list[asyncio.Future[R]]:
        """Enqueue all payloads of one request in one lane, or none of them when it is full; one future each."""
        if self._closing:
            raise NotReadyError("the service is shutting down; retry on another instance")
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {priority}")
        costs = [1] * len(payloads) if costs is None else list(costs)
        lane = self._heavy if heavy else self._cheap
        loop = asyncio.get_running_loop()
        with self._lock:
            if len(lane) + len(payloads) > self.max_queue:
                raise OverloadedError(
                    f"model {self.name!r} is overloaded: {len(lane)} images are queued "
                    f"(limit {self.max_queue}); retry shortly",
                    retry_after_s=1,
                )
            work = sum(costs)
            if heavy and self.max_heavy_work is not None and self._heavy_work + work > self.max_heavy_work:
                wait = self.estimate_s(0)
                raise OverloadedError(
                    f"model {self.name!r} holds {self._heavy_work} forward-equivalents of heavy work (limit "
                    f"{self.max_heavy_work}); this request adds {work}: retry later, or use a cheaper method",
                    retry_after_s=max(1, round(wait)) if wait is not None else 5,
                )
            entries = [
                _Entry(p, loop.create_future(), cost, heavy, priority) for p, cost in zip(payloads, costs, strict=True)
            ]
            lane.waiting[priority].extend(entries)
            self._work += work
            if heavy:
                self._heavy_work += work
        self._idle.clear()
        self._wakeup.set()
        return [entry.future for entry in entries]

    async def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new items, finish what is queued, stop."""
        self._closing = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        except TimeoutError:
            log.warning("queue %s: %d items unfinished at shutdown", self.name, self.depth)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        ahead: tuple[list[_Entry[P, R]], asyncio.Future[list[Any]]] | None = None
        previous_cheap = False
        while True:
            staged: list[Any] | None = None
            if ahead is not None:
                (batch, staging), ahead = ahead, None
                try:
                    staged = await staging
                except Exception:  # staging is an optimisation: the batch then runs as it is
                    log.exception("queue %s: staging a batch failed", self.name)
                self._staged_items = 0
                heavy = False
            else:
                if not self.depth:
                    self._idle.set()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if self.max_wait_s and 0 < len(self._cheap) < self.max_batch_size:
                    await self._hold_for_more()
                # heavy work takes its turn after a cheap batch, even when more cheap work waits: it then runs
                # cheap batches at its pauses, so neither lane starves
                heavy = previous_cheap and len(self._heavy) > 0
                batch = self._take_batch(heavy=heavy)
                if not batch:
                    heavy = not heavy
                    batch = self._take_batch(heavy=heavy)
            if not batch:
                continue
            started = time.perf_counter()
            self._computing = len(batch)
            computing = self._thread.run(self._compute_on_thread, batch, staged, heavy)
            if self._overlap and not heavy and len(self._cheap) >= self.max_batch_size:  # a full batch waits anyway
                following = self._take_batch(heavy=False)
                self._staged_items = len(following)
                assert self._stage is not None
                ahead = (following, loop.run_in_executor(None, self._stage, [e.payload for e in following]))
            try:
                outputs, nested_s = await computing
            except Exception as exc:  # the batch function should answer per item; if it raised, all fail
                log.exception("queue %s: batch of %d failed", self.name, len(batch))
                outputs, nested_s = [exc] * len(batch), 0.0
            finally:
                self._computing = 0
            elapsed = time.perf_counter() - started
            previous_cheap = not heavy
            if heavy:
                self._measure(sum(e.cost for e in batch), elapsed - nested_s)
            if self._on_batch is not None:
                self._on_batch(self.name, len(batch), elapsed - nested_s)
            for entry, output in zip(batch, outputs, strict=True):
                self._resolve(entry, output)

    async def _hold_for_more(self) -> None:
        oldest = self._cheap.oldest()
        deadline = (oldest if oldest is not None else time.perf_counter()) + self.max_wait_s
        while len(self._cheap) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _resolve(self, entry: _Entry[P, R], output: Any) -> None:
        """On the event loop: answer the entry (once) and count its work done."""
        if entry.settled:
            return
        entry.settled = True
        with self._lock:
            self._work -= entry.cost
            if entry.heavy:
                self._heavy_work -= entry.cost
        if entry.future.done():
            return
        if isinstance(output, BaseException):
            entry.future.set_exception(output)
        else:
            entry.future.set_result(output)

    def _measure(self, work: int, seconds: float) -> None:
        if work <= 0 or seconds <= 0:
            return
        rate = seconds / work
        self._seconds_per_work = rate if self._seconds_per_work is None else 0.7 * self._seconds_per_work + 0.3 * rate

    def _take_batch(self, *, heavy: bool) -> list[_Entry[P, R]]:
        """Up to max_batch_size live entries of one lane, highest priority first; entries whose caller gave up are
        dropped here (their work with them). Called from the event loop, and from the torch thread at pauses."""
        lane = self._heavy if heavy else self._cheap
        batch: list[_Entry[P, R]] = []
        with self._lock:
            for priority in PRIORITIES:
                waiting = lane.waiting[priority]
                while waiting and len(batch) < self.max_batch_size:
                    entry = waiting.popleft()
                    if not entry.future.done():
                        batch.append(entry)
                    elif not entry.settled:
                        entry.settled = True
                        self._work -= entry.cost
                        self._heavy_work -= entry.cost if entry.heavy else 0
        return batch

    # -- the torch thread's side -------------------------------------------------------------
    def _compute_on_thread(
        self, batch: list[_Entry[P, R]], staged: list[Any] | None, heavy: bool
    ) -> tuple[list[Any], float]:
        """Run one batch. A heavy one takes turns with the heavy batches that join it at its pauses (`_Baton`) and
        returns when all of them are done; returns its outputs and the seconds not spent on its own work."""
        payloads = [entry.payload for entry in batch]
        if not heavy:
            return self._compute(payloads, staged, self._deliverer(batch)), 0.0
        started = time.perf_counter()
        baton = _Baton()
        home = baton.join()
        try:
            outputs, busy = self._heavy_turn(batch, staged, baton, home)
        finally:
            baton.open = False
            baton.leave(home)
            baton.wait_empty()  # torch stays on one thread at a time: this one returns when the others are done
        return outputs, time.perf_counter() - started - busy

    def _heavy_turn(
        self, batch: list[_Entry[P, R]], staged: list[Any] | None, baton: _Baton, turn: object
    ) -> tuple[list[Any], float]:
        """Compute a heavy batch while holding `turn`; at each of its pauses, one cheap batch that waits runs, a heavy
        batch that waits joins the ring (on a thread of its own), and the next turn runs. Answers each item when its
        batch is done; returns the outputs and the seconds spent on this batch's own work."""
        paused = [0.0]

        def at_pause() -> None:
            began = time.perf_counter()
            self._run_cheap()
            if baton.open and len(baton) < MAX_HEAVY_TURNS and (joining := self._take_batch(heavy=True)):
                self._start_turn(joining, baton)
            baton.pass_on(turn)
            paused[0] += time.perf_counter() - began

        started = time.perf_counter()
        deliver = self._deliverer(batch)
        with pausing(at_pause):
            outputs = self._compute([entry.payload for entry in batch], staged, deliver)
        for index, output in enumerate(outputs):
            deliver(index, output)
        return outputs, time.perf_counter() - started - paused[0]

    def _start_turn(self, batch: list[_Entry[P, R]], baton: _Baton) -> None:
        """`batch` joins the ring on a thread of its own; where no thread starts, it goes back to the head of its lane
        (it runs after this ring, as before turns existed)."""
        self._computing += len(batch)
        turn = baton.join()
        try:
            name = f"camserve-heavy-{self.name}"
            threading.Thread(target=self._heavy_thread, args=(batch, baton, turn), name=name, daemon=True).start()
        except RuntimeError as exc:  # e.g. "can't start new thread" at the container's limit
            baton.leave(turn)
            self._computing -= len(batch)
            with self._lock:
                for entry in reversed(batch):
                    self._heavy.waiting[entry.priority].appendleft(entry)
            log.warning("queue %s: heavy work waits for its turn after this batch (%s)", self.name, exc)

    def _heavy_thread(self, batch: list[_Entry[P, R]], baton: _Baton, turn: object) -> None:
        """A heavy batch that joined another's ring: waits for its turn, computes, answers, leaves the ring."""
        baton.wait(turn)
        busy = 0.0
        try:
            _outputs, busy = self._heavy_turn(batch, None, baton, turn)
        except Exception as exc:  # the batch function should answer per item; if it raised, all fail
            log.exception("queue %s: batch of %d failed", self.name, len(batch))
            deliver = self._deliverer(batch)
            for index in range(len(batch)):
                deliver(index, exc)
        finally:
            self._computing -= len(batch)
            baton.leave(turn)
        self._call_on_loop(self._heavy_done, batch, busy)

    def _heavy_done(self, batch: list[_Entry[P, R]], busy: float) -> None:
        """On the event loop: a joined heavy batch's rate and observation, as `_run` records the first one's."""
        self._measure(sum(entry.cost for entry in batch), busy)
        if self._on_batch is not None:
            self._on_batch(self.name, len(batch), busy)

    def _run_cheap(self) -> None:
        """One cheap batch that waits, computed now on this thread (at a heavy batch's pause)."""
        cheap = self._take_batch(heavy=False)
        if not cheap:
            return
        started = time.perf_counter()
        deliver = self._deliverer(cheap)
        self._computing += len(cheap)
        try:
            outputs = self._compute([e.payload for e in cheap], None, deliver)
        except Exception as exc:
            log.exception("queue %s: batch of %d failed", self.name, len(cheap))
            outputs = [exc] * len(cheap)
        finally:
            self._computing -= len(cheap)
        for index, output in enumerate(outputs):
            deliver(index, output)
        if self._on_batch is not None:
            self._call_on_loop(self._on_batch, self.name, len(cheap), time.perf_counter() - started)

    def _deliverer(self, batch: list[_Entry[P, R]]) -> Deliver:
        """`deliver(index, output)` for the batch function: answers that entry from the torch thread, at once."""

        def deliver(index: int, output: Any) -> None:
            self._call_on_loop(self._resolve, batch[index], output)

        return deliver

    def _call_on_loop(self, function: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the loop is closed (shut down): nobody waits for this any more
            log.debug("queue %s: the event loop is closed; %s dropped", self.name, getattr(function, "__name__", ""))
