"""Dynamic batching: a bounded queue, one future per item, one loop that forms batches.

Generic over the item and result types; knows nothing of HTTP or torch. The compute function runs
in the executor it is given (one worker thread per model), never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor, Executor
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger("evalserve.batching")


class BatcherError(Exception):
    """Base of the batcher's refusals and failures."""


class QueueFull(BatcherError):
    """The queue has no room for the request's items right now; retry later."""


class TooManyItems(BatcherError):
    """The request has more items than the queue can ever hold."""


class DeadlineExceeded(BatcherError):
    """The request's results did not arrive in time; its queued items were dropped."""


class BatcherClosed(BatcherError):
    """The batcher is shutting down and takes no new items."""


class BatchFailed(BatcherError):
    """The compute function raised on the batch this item was in (logged once, server-side)."""


class BatcherDead(BatcherError):
    """The batch loop itself died (a bug, logged with its traceback): nothing will be computed."""


class BatchTooLarge(BatcherError):
    """The batch holding this item did not fit, nor did its half retried alone: ``compute``
    raised the batcher's ``split_on`` error (out of memory) twice. Later batches may fit."""


class WorkerLost(BatcherError):
    """The executor takes no more work (shut down, or broken): no batch can ever be computed.
    The batch loop dies of it."""


class BatchObserver(Protocol):
    """Told about every batch, e.g. to record metrics. Called on the event loop: keep it cheap."""

    def batch_done(self, queue_seconds: Sequence[float], compute_seconds: float) -> None:
        """A batch succeeded; how long each of its items waited, and how long its steps ran
        (stage and compute, in their threads)."""

    def batch_failed(self, size: int) -> None:
        """A batch of ``size`` items raised."""

    def batch_split(self, size: int) -> None:
        """A batch of ``size`` items raised ``split_on`` and is retried as two halves."""

    def batch_stalled(self, size: int) -> None:
        """A batch of ``size`` items has computed for longer than ``stall_after_s`` (and still
        does: ``Batcher.stalled`` is true until it returns)."""


@dataclass(slots=True)
class _Item(Generic[T, R]):
    payload: T
    future: asyncio.Future[R]
    enqueued_at: float


class Arrival:
    """Items on their way to the queue (their request is still decoding them).

    With ``close_when_idle``, a gathering batch waits, up to the batch delay, only while some are
    announced; when none are, it closes at once instead of sleeping out the delay for company
    that is not coming (the single-client case).
    """

    __slots__ = ("_batcher", "_count")

    def __init__(self, batcher: Batcher[Any, Any], count: int) -> None:
        self._batcher: Batcher[Any, Any] | None = batcher
        self._count = count
        batcher._expected += count

    def cancel(self) -> None:
        """The items arrived (or never will). Idempotent."""
        if self._batcher is not None:
            self._batcher._expected -= self._count
            self._batcher._wakeup.set()
            self._batcher = None


@dataclass(slots=True)
class BatchStats:
    """Running totals, for tests and metrics."""

    batches: int = 0
    items: int = 0
    largest_batch: int = 0
    failed_batches: int = 0
    split_batches: int = 0
    stalled_batches: int = 0


class Batcher(Generic[T, R]):
    """Collects items from concurrent callers into batches for ``compute``.

    A batch closes when it holds ``max_batch_size`` items or when ``max_delay_s`` has passed since
    its first item *arrived* (so items that queued while the previous batch ran do not wait again).
    While one batch computes, the next keeps gathering in the queue.

    ``compute`` may answer an item with an exception instead of a result (an image that turned
    out undecodable): that item alone fails with it.

    With ``stage`` (and its ``stage_executor``), each batch runs in two steps: ``stage(payloads)``
    in the stage executor, then ``compute`` of what it returned in ``executor``; and the next
    batch is collected and staged while this one computes (two batches in flight at most, one
    computing). A GPU model stages (copies and decodes) batch N+1 while batch N runs.

    A batch that raises ``split_on`` (out of memory) is computed again as two halves, once; the
    items of a half that raises it again fail with ``BatchTooLarge``. A batch that computes for
    longer than ``stall_after_s`` makes ``stalled`` true (and is logged) until it returns. An
    executor that refuses work kills the loop (``WorkerLost``), as a bug in the loop does.
    """

    def __init__(
        self,
        compute: Callable[[Any], Sequence[R | Exception]],
        executor: Executor,
        *,
        stage: Callable[[list[T]], Any] | None = None,
        stage_executor: Executor | None = None,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        name: str = "batcher",
        observer: BatchObserver | None = None,
        close_when_idle: bool = False,
        on_death: Callable[[BaseException], None] | None = None,
        split_on: type[Exception] | tuple[type[Exception], ...] = (),
        stall_after_s: float | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1, max_delay_s >= 0")
        if stall_after_s is not None and stall_after_s <= 0:
            raise ValueError("stall_after_s must be > 0")
        if (stage is None) != (stage_executor is None):
            raise ValueError("stage and stage_executor go together")
        self._compute = compute
        self._executor = executor
        self._stage = stage
        self._stage_executor = stage_executor
        # Batches in flight at once: with a stage step, one computing and the next staging.
        self._depth = 1 if stage is None else 2
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_size = max_queue_size
        self.name = name
        self.stats = BatchStats()
        self._observer = observer
        # Told once if the batch loop dies: the owner turns not-ready and stops the process.
        self._on_death = on_death
        self.death: BaseException | None = None
        self._split_on = split_on
        self.stall_after_s = stall_after_s
        self._stalled = 0  # batches in flight that have computed for longer than stall_after_s
        # With close_when_idle, a batch waits out the delay only while arrivals are announced.
        self._close_when_idle = close_when_idle
        # A deque we own rather than asyncio.Queue: waiting is on an Event, so a timed-out wait
        # can never swallow an item, and cancelled items can be pruned when room is needed.
        self._items: deque[_Item[T, R]] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._expected = 0
        # The batches being staged or computed, by id.
        self._running: dict[int, list[_Item[T, R]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def depth(self) -> int:
        """Items waiting (not yet taken into a batch)."""
        return len(self._items)

    @property
    def in_flight(self) -> int:
        """Items in the batches being computed (or staged) now."""
        return sum(len(batch) for batch in self._running.values())

    @property
    def announced(self) -> int:
        """Items announced (``announce``) and not yet submitted: their request is decoding."""
        return self._expected

    @property
    def stalled(self) -> bool:
        """The batch computing now has run for longer than ``stall_after_s`` (hung, or far
        slower than its callers wait for); false again once it returns."""
        return self._stalled > 0

    @property
    def alive(self) -> bool:
        """Started and its loop has not died (stopping cleanly still counts as alive)."""
        return self._task is not None and self.death is None

    def check_fits(self, count: int) -> None:
        """Raise ``TooManyItems`` when ``count`` items could never be queued together: the one
        place this limit is checked, so callers may check before they decode anything."""
        if count > self.max_queue_size:
            raise TooManyItems(f"{count} items, the queue holds at most {self.max_queue_size}")

    def announce(self, count: int) -> Arrival:
        """Say that ``count`` items will be submitted soon; pass the result to ``submit``."""
        return Arrival(self, count)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"batcher:{self.name}"
            )

    async def stop(self) -> None:
        """Refuse new items, finish every item already queued, then end the loop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def submit(
        self,
        payloads: Sequence[T],
        timeout: float,  # noqa: ASYNC109 (a deadline for the results, not a cancel scope)
        arrival: Arrival | None = None,
    ) -> list[R]:
        """Queue ``payloads`` together and wait for their results, in order.

        All or nothing: either every item is queued or the call fails at once with
        ``QueueFull``/``TooManyItems``/``BatcherClosed``. On timeout or cancellation the items still
        queued are dropped (never computed). ``arrival``, from ``announce``, is settled here.
        """
        if arrival is not None:
            arrival.cancel()  # in the same step as the enqueue below: no batch sees neither
        count = len(payloads)
        self.check_fits(count)
        if self.death is not None:
            raise BatcherDead(f"{self.name} stopped computing: its batch loop died")
        if self._closing or self._task is None:
            raise BatcherClosed(f"{self.name} is not accepting work")
        if self.max_queue_size - len(self._items) < count:
            self._prune_done()
            if self.max_queue_size - len(self._items) < count:
                raise QueueFull(f"{self.name} queue is full ({len(self._items)} waiting)")
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures: list[asyncio.Future[R]] = []
        for payload in payloads:
            future: asyncio.Future[R] = loop.create_future()
            self._items.append(_Item(payload, future, now))
            futures.append(future)
        self._wakeup.set()
        try:
            async with asyncio.timeout(timeout):
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            raise DeadlineExceeded(f"no result within {timeout:.3f}s") from None
        finally:
            # Timed out, cancelled, or a sibling failed: the loop skips futures that are done.
            for future in futures:
                future.cancel()

    def _prune_done(self) -> None:
        self._items = deque(item for item in self._items if not item.future.done())

    def _pop_live(self) -> _Item[T, R] | None:
        while self._items:
            item = self._items.popleft()
            if not item.future.done():
                return item
        return None

    async def _collect(self) -> list[_Item[T, R]] | None:
        """The next batch, or None once closing with nothing left."""
        loop = asyncio.get_running_loop()
        first = self._pop_live()
        while first is None:
            if self._closing or self.death is not None:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
            first = self._pop_live()
        batch = [first]
        close_at = first.enqueued_at + self.max_delay_s
        while len(batch) < self.max_batch_size:
            item = self._pop_live()
            if item is not None:
                batch.append(item)
                continue
            remaining = close_at - loop.time()
            if remaining <= 0 or self._closing:
                break
            if self._close_when_idle and self._expected == 0:
                break
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        try:
            await self._loop()
        except Exception as exc:  # a bug in the loop itself: never die silently
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        """Record the loop's death, log it with its traceback, fail every item it still held
        (so no caller waits out its timeout), and tell the owner."""
        if self.death is not None:
            return
        self.death = exc
        self._stalled = 0
        logger.critical("%s: the batch loop died; no more batches", self.name, exc_info=exc)
        error = BatcherDead(f"{self.name} stopped computing: its batch loop died")
        held = [item for batch in self._running.values() for item in batch]
        for item in [*held, *self._items]:
            if not item.future.done():
                item.future.set_exception(error)
        self._items.clear()
        self._running.clear()
        self._wakeup.set()  # the loop may be waiting for items: it sees the death
        if self._on_death is not None:
            self._on_death(exc)

    def _notify(self, event: str, *args: Any) -> None:
        """Tell the observer, if any; its failure is logged and never stops a batch's answers."""
        if self._observer is None:
            return
        try:
            getattr(self._observer, event)(*args)
        except Exception:
            logger.exception("%s: the batch observer failed on %s", self.name, event)

    async def _loop(self) -> None:
        slots = asyncio.Semaphore(self._depth)
        try:
            while self.death is None:
                await slots.acquire()
                batch = await self._collect()
                if batch is None or not self._start(batch, slots):
                    break
                # Nothing of the batch stays referenced here while the next one gathers: an
                # answered item's payload (an image, a shared-memory region) is freed at once.
                del batch
        finally:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start(self, batch: list[_Item[T, R]], slots: asyncio.Semaphore) -> bool:
        """Start computing ``batch`` in a task of its own (it holds one of ``slots`` until
        done); False when the loop has died meanwhile (its items then fail)."""
        # Items whose caller gave up while the batch gathered are not computed.
        live = [item for item in batch if not item.future.done()]
        if self.death is not None:
            for item in live:
                item.future.set_exception(
                    BatcherDead(f"{self.name} stopped computing: its batch loop died")
                )
            return False
        if not live:
            slots.release()
            return True
        task = asyncio.get_running_loop().create_task(self._batch(live))
        self._tasks.add(task)
        task.add_done_callback(partial(self._batch_finished, slots))
        return True

    def _batch_finished(self, slots: asyncio.Semaphore, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        slots.release()

    async def _batch(self, live: list[_Item[T, R]]) -> None:
        """Stage (if so made), compute and answer one batch; a failure of the loop's own (a bug,
        or ``WorkerLost``) kills the loop."""
        loop = asyncio.get_running_loop()
        key = id(live)
        self._running[key] = live
        started = loop.time()
        stalled = False

        def stall() -> None:
            nonlocal stalled
            stalled = True
            self._stall(len(live), started)

        watch = (
            loop.call_later(self.stall_after_s, stall) if self.stall_after_s is not None else None
        )
        try:
            await self._answer(live)
        except Exception as exc:
            self._die(exc)
        finally:
            if watch is not None:
                watch.cancel()
            self._running.pop(key, None)
            if stalled and self.death is None:
                self._stalled -= 1
                logger.warning(
                    "%s: the stalled batch returned after %.1f s", self.name, loop.time() - started
                )

    async def _answer(self, live: list[_Item[T, R]]) -> None:
        """Compute ``live`` and answer every item. When it does not fit (``split_on``), once
        more as two halves: a half that does not fit either is answered ``BatchTooLarge``."""
        reason = await self._attempt(live)
        if reason is None:
            return
        if len(live) == 1:
            self._too_large(live, reason)
            return
        # The error, and whatever its traceback held (the batch's tensors), is gone by now.
        self.stats.split_batches += 1
        logger.warning(
            "%s: a batch of %d items did not fit (%s); computing it as two halves",
            self.name,
            len(live),
            reason,
        )
        self._notify("batch_split", len(live))
        middle = (len(live) + 1) // 2
        for half in (live[:middle], live[middle:]):
            half = [item for item in half if not item.future.done()]
            if half and (reason := await self._attempt(half)) is not None:
                self._too_large(half, reason)

    async def _attempt(self, items: list[_Item[T, R]]) -> str | None:
        """Compute ``items`` and answer them: their results, or ``BatchFailed``. When
        ``compute`` raised ``split_on`` instead, answer none and return why."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        payloads = [item.payload for item in items]
        try:
            if self._stage is not None:
                assert self._stage_executor is not None
                staged, staging = await self._in(self._stage_executor, self._stage, payloads)
                outputs, computing = await self._in(self._executor, self._compute, staged)
                computing += staging
            else:
                outputs, computing = await self._in(self._executor, self._compute, payloads)
            pairs = list(zip(items, outputs, strict=True))
        except WorkerLost:
            raise
        except self._split_on as exc:
            return str(exc) or type(exc).__name__
        except Exception as exc:
            self.stats.failed_batches += 1
            logger.error("%s: a batch of %d items failed", self.name, len(items), exc_info=exc)
            for item in items:
                if not item.future.done():
                    item.future.set_exception(BatchFailed(f"batch failed: {exc!r}"))
            self._notify("batch_failed", len(items))
            return None
        self.stats.batches += 1
        self.stats.items += len(items)
        self.stats.largest_batch = max(self.stats.largest_batch, len(items))
        for item, output in pairs:
            if item.future.done():
                continue
            if isinstance(output, Exception):
                item.future.set_exception(output)
            else:
                item.future.set_result(output)
        self._notify("batch_done", [started - item.enqueued_at for item in items], computing)
        return None

    async def _in(
        self, executor: Executor, function: Callable[[Any], Any], argument: Any
    ) -> tuple[Any, float]:
        """``function(argument)`` in ``executor``, and the seconds it ran there (not counting
        its wait for the executor: with two batches in flight, one waits for the other);
        ``WorkerLost`` when the executor takes no more work."""
        loop = asyncio.get_running_loop()
        try:
            pending = loop.run_in_executor(executor, _timed, function, argument)
        except Exception as exc:  # shut down (RuntimeError), or broken: for good
            raise WorkerLost(f"{self.name}: its worker takes no more work ({exc})") from exc
        try:
            return await pending
        except BrokenExecutor as exc:
            raise WorkerLost(f"{self.name}: its worker is broken ({exc})") from exc

    def _too_large(self, items: list[_Item[T, R]], reason: str) -> None:
        logger.error(
            "%s: %d items did not fit, alone or in their half of a batch (%s); answered as too "
            "large",
            self.name,
            len(items),
            reason,
        )
        for item in items:
            if not item.future.done():
                item.future.set_exception(
                    BatchTooLarge(f"a batch of {len(items)} did not fit: {reason}")
                )

    def _stall(self, size: int, started: float) -> None:
        """The batch begun at ``started`` is still computing after ``stall_after_s``."""
        self._stalled += 1
        self.stats.stalled_batches += 1
        logger.error(
            "%s: a batch of %d items has computed for %.1f s (the limit is %.1f s); "
            "not ready until it returns",
            self.name,
            size,
            asyncio.get_running_loop().time() - started,
            self.stall_after_s,
        )
        self._notify("batch_stalled", size)


def _timed(function: Callable[[Any], Any], argument: Any) -> tuple[Any, float]:
    began = time.perf_counter()
    result = function(argument)
    return result, time.perf_counter() - began
