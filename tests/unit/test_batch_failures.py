"""Failures the batcher makes visible, driven with plain Python compute functions (no torch, no
HTTP): a batch out of memory is computed again in halves, a forward pass that runs past its
limit marks the batcher stalled until it returns, and a worker that takes no more work kills
the batch loop (logged, told to the owner) instead of failing every batch forever."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import BrokenExecutor, Executor, Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import pytest

from app.batching import Batcher, BatcherDead, BatchFailed, BatchTooLarge, WorkerLost
from app.values import OutOfMemory

PATIENCE_S = 5.0


class Forward:
    """A compute function that runs out of memory on batches larger than ``fits`` (None: never),
    and remembers the size of every batch it was called with."""

    def __init__(self, fits: int | None) -> None:
        self.fits = fits
        self.sizes: list[int] = []

    def __call__(self, payloads: list[int]) -> list[int]:
        self.sizes.append(len(payloads))
        if self.fits is not None and len(payloads) > self.fits:
            raise OutOfMemory(f"a batch of {len(payloads)} did not fit")
        return [payload * 2 for payload in payloads]


class Events:
    """A BatchObserver that writes down what it is told."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def batch_done(self, queue_seconds: Sequence[float], compute_seconds: float) -> None:  # noqa: ARG002
        self.seen.append(("done", len(queue_seconds)))

    def batch_failed(self, size: int) -> None:
        self.seen.append(("failed", size))

    def batch_split(self, size: int) -> None:
        self.seen.append(("split", size))

    def batch_stalled(self, size: int) -> None:
        self.seen.append(("stalled", size))


@asynccontextmanager
async def running(
    compute: Callable[[list[Any]], Sequence[Any]],
    executor: Executor | None = None,
    **options: Any,
) -> AsyncIterator[Batcher[Any, Any]]:
    """A started batcher over a one-worker executor, as a model has; stopped on exit."""
    own = executor is None
    pool = executor if executor is not None else ThreadPoolExecutor(max_workers=1)
    settings: dict[str, Any] = {
        "max_batch_size": 8,
        "max_delay_s": 0.0,
        "max_queue_size": 64,
        "name": "test",
        "split_on": OutOfMemory,
    }
    settings.update(options)
    batcher: Batcher[Any, Any] = Batcher(compute, pool, **settings)
    batcher.start()
    try:
        yield batcher
    finally:
        await batcher.stop()
        if own:
            pool.shutdown(wait=True)


# --- out of memory: the batch again, in halves ----------------------------------------------


def test_a_batch_out_of_memory_is_computed_again_as_two_halves_and_every_item_answered():
    forward, events = Forward(fits=4), Events()

    async def scenario():
        async with running(forward, observer=events) as batcher:
            # One request of 8 fills a batch of 8 at once.
            results = await batcher.submit(list(range(8)), timeout=PATIENCE_S)
            return results, batcher.stats, batcher.alive

    results, stats, alive = asyncio.run(scenario())

    assert results == [x * 2 for x in range(8)]
    assert forward.sizes == [8, 4, 4]
    assert stats.split_batches == 1
    assert stats.failed_batches == 0
    assert events.seen == [("split", 8), ("done", 4), ("done", 4)]
    assert alive


def test_halves_that_do_not_fit_either_are_answered_too_large_and_serving_goes_on(caplog):
    forward, events = Forward(fits=0), Events()

    async def scenario():
        async with running(forward, observer=events) as batcher:
            with pytest.raises(BatchTooLarge) as refused:
                await batcher.submit(list(range(8)), timeout=PATIENCE_S)
            # The request fails with its first refused half; the other half may still run.
            while batcher.in_flight:
                await asyncio.sleep(0.001)
            forward.fits = None  # the memory is back
            later = await batcher.submit([5], timeout=PATIENCE_S)
            return refused.value, later, batcher.alive

    refused, later, alive = asyncio.run(scenario())

    assert "did not fit" in str(refused)
    # Split once only: two halves of 4, never quarters.
    assert forward.sizes == [8, 4, 4, 1]
    assert later == [10]
    assert alive
    assert events.seen == [("split", 8), ("done", 1)]
    refusals = [r for r in caplog.records if "answered as too large" in r.getMessage()]
    assert [r.levelno for r in refusals] == [logging.ERROR, logging.ERROR]  # one per half


def test_only_the_half_that_does_not_fit_is_refused():
    """Two requests of 4 share a batch of 8; the second half still does not fit."""

    def forward(payloads: list[int]) -> list[int]:
        if len(payloads) > 4 or 100 in payloads:
            raise OutOfMemory("did not fit")
        return [payload * 2 for payload in payloads]

    async def scenario():
        async with running(forward, max_delay_s=1.0) as batcher:
            first = asyncio.create_task(batcher.submit([1, 2, 3, 4], timeout=PATIENCE_S))
            second = asyncio.create_task(batcher.submit([100, 6, 7, 8], timeout=PATIENCE_S))
            return await asyncio.gather(first, second, return_exceptions=True)

    first, second = asyncio.run(scenario())

    assert first == [2, 4, 6, 8]
    assert isinstance(second, BatchTooLarge)


def test_a_lone_item_out_of_memory_is_refused_without_a_retry():
    forward = Forward(fits=0)

    async def scenario():
        async with running(forward) as batcher:
            with pytest.raises(BatchTooLarge):
                await batcher.submit([1], timeout=PATIENCE_S)
            return batcher.stats

    stats = asyncio.run(scenario())

    assert forward.sizes == [1]
    assert stats.split_batches == 0


def test_another_error_in_a_half_fails_that_half_only():
    calls: list[list[int]] = []

    def forward(payloads: list[int]) -> list[int]:
        calls.append(list(payloads))
        if len(payloads) > 2:
            raise OutOfMemory("did not fit")
        if 0 in payloads:
            raise ValueError("a bug in the model")
        return [payload * 2 for payload in payloads]

    async def scenario():
        async with running(forward, max_delay_s=1.0, max_batch_size=4) as batcher:
            tasks = [asyncio.create_task(batcher.submit([i], timeout=PATIENCE_S)) for i in range(4)]
            return await asyncio.gather(*tasks, return_exceptions=True), batcher.stats

    results, stats = asyncio.run(scenario())

    assert calls == [[0, 1, 2, 3], [0, 1], [2, 3]]
    assert isinstance(results[0], BatchFailed)
    assert isinstance(results[1], BatchFailed)
    assert results[2:] == [[4], [6]]
    assert stats.failed_batches == 1


def test_without_split_on_an_out_of_memory_batch_just_fails():
    forward = Forward(fits=4)

    async def scenario():
        async with running(forward, split_on=()) as batcher:
            with pytest.raises(BatchFailed):
                await batcher.submit(list(range(8)), timeout=PATIENCE_S)

    asyncio.run(scenario())

    assert forward.sizes == [8]


# --- a forward pass that hangs ---------------------------------------------------------------


def test_a_batch_computing_past_its_limit_is_stalled_until_it_returns(caplog):
    release = threading.Event()
    events = Events()

    def hang(payloads: list[int]) -> list[int]:
        release.wait(PATIENCE_S)
        return [payload * 2 for payload in payloads]

    async def scenario():
        async with running(hang, observer=events, stall_after_s=0.1) as batcher:
            loop = asyncio.get_running_loop()
            work = asyncio.create_task(batcher.submit([1, 2], timeout=2 * PATIENCE_S))
            await asyncio.sleep(0.02)
            early = batcher.stalled
            began = loop.time()
            while not batcher.stalled and loop.time() - began < PATIENCE_S:
                await asyncio.sleep(0.01)
            during = batcher.stalled
            release.set()
            results = await work
            return early, during, results, batcher.stalled, batcher.stats

    early, during, results, after, stats = asyncio.run(scenario())

    assert not early
    assert during
    assert results == [2, 4]
    assert not after
    assert stats.stalled_batches == 1
    assert ("stalled", 2) in events.seen
    stalls = [r for r in caplog.records if "not ready until it returns" in r.getMessage()]
    assert [r.levelno for r in stalls] == [logging.ERROR]
    assert any("the stalled batch returned" in r.getMessage() for r in caplog.records)


def test_batches_quicker_than_the_limit_never_stall():
    async def scenario():
        async with running(Forward(fits=None), stall_after_s=0.5) as batcher:
            for i in range(5):
                await batcher.submit([i], timeout=PATIENCE_S)
                assert not batcher.stalled
            await asyncio.sleep(0.6)  # no timer left behind to fire after its batch
            return batcher.stalled, batcher.stats

    stalled, stats = asyncio.run(scenario())

    assert not stalled
    assert stats.stalled_batches == 0


def test_stall_after_must_be_positive():
    with ThreadPoolExecutor(max_workers=1) as pool, pytest.raises(ValueError, match="stall_after"):
        Batcher(
            Forward(fits=None),
            pool,
            max_batch_size=1,
            max_delay_s=0.0,
            max_queue_size=1,
            stall_after_s=0.0,
        )


# --- a worker that takes no more work --------------------------------------------------------


class BrokenWorker(Executor):
    """An executor whose work items all fail as a broken pool's do."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:  # noqa: ARG002
        future: Future[Any] = Future()
        future.set_exception(BrokenExecutor("the worker thread died"))
        return future


def _shut_down() -> Executor:
    pool = ThreadPoolExecutor(max_workers=1)
    pool.shutdown()
    return pool


@pytest.mark.parametrize("worker", [_shut_down, BrokenWorker], ids=["shut-down", "broken"])
def test_a_worker_that_takes_no_more_work_kills_the_loop_and_tells_the_owner(worker, caplog):
    deaths: list[BaseException] = []

    async def scenario():
        async with running(Forward(fits=None), worker(), on_death=deaths.append) as batcher:
            with pytest.raises(BatcherDead):
                await batcher.submit([1], timeout=PATIENCE_S)
            with pytest.raises(BatcherDead):  # at once: the next caller is refused
                await batcher.submit([2], timeout=PATIENCE_S)
            return batcher.alive, batcher.stats

    alive, stats = asyncio.run(scenario())

    assert not alive
    assert stats.failed_batches == 0  # not a failed batch, retried forever: a death
    assert [type(death) for death in deaths] == [WorkerLost]
    [record] = [r for r in caplog.records if "batch loop died" in r.getMessage()]
    assert record.levelno == logging.CRITICAL
    assert record.exc_info is not None
