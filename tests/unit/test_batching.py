"""The dynamic batcher, driven with plain Python compute functions (no torch, no HTTP).

Each test owns a one-worker ThreadPoolExecutor, as a model does. To hold items in the queue, a test
parks the worker on a ``threading.Event`` (``Gate``) and lets the batcher take one "plug" batch out
of the queue: that batch then waits for the worker, and everything submitted afterwards stays
queued until the gate opens.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest

from app.batching import (
    Batcher,
    BatcherClosed,
    BatchFailed,
    DeadlineExceeded,
    QueueFull,
    TooManyItems,
)

# Long enough never to fire in a passing test; only there so a broken batcher fails, not hangs.
PATIENCE_S = 2.0


@contextmanager
def one_worker() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-model")
    try:
        yield executor
    finally:
        executor.shutdown(wait=True)


class Recorder:
    """A compute function that remembers every batch (and thread) it was called with."""

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]] | None = None) -> None:
        self.fn = fn or (lambda xs: [x * 2 for x in xs])
        self.batches: list[list[Any]] = []
        self.threads: set[int] = set()

    def __call__(self, payloads: list[Any]) -> Sequence[Any]:
        self.batches.append(list(payloads))
        self.threads.add(threading.get_ident())
        return self.fn(payloads)

    @property
    def seen(self) -> list[Any]:
        return [payload for batch in self.batches for payload in batch]


class Gate:
    """Parks the executor's only worker thread until ``release()``."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        self._open = threading.Event()
        self._future = executor.submit(self._open.wait, 5.0)

    def release(self) -> None:
        self._open.set()


def make_batcher(compute: Callable[[list[Any]], Sequence[Any]], executor, **options) -> Batcher:
    settings = {"max_batch_size": 4, "max_delay_s": 0.0, "max_queue_size": 16, "name": "test"}
    settings.update(options)
    return Batcher(compute, executor, **settings)


async def eventually(predicate: Callable[[], bool]) -> None:
    """Let the event loop run until ``predicate()`` holds; TimeoutError after PATIENCE_S."""
    async with asyncio.timeout(PATIENCE_S):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.001)


async def plug(batcher: Batcher, payloads: Sequence[Any] = (1000,)) -> asyncio.Task:
    """Submit ``payloads`` and wait until the batcher has taken them out of the queue.

    With the worker parked, that batch then waits in the executor, and the batcher's loop with it.
    """
    task = asyncio.create_task(batcher.submit(payloads, timeout=PATIENCE_S))
    await asyncio.sleep(0)  # the task runs first and queues its items
    await eventually(lambda: batcher.depth == 0)
    await asyncio.sleep(0.01)  # the closed batch reaches the executor
    return task


# --- results and batching ---------------------------------------------------------------------


def test_results_come_back_in_order_to_their_own_submitters():
    rng = random.Random(1234)
    requests = [[rng.randrange(10_000) for _ in range(rng.randint(1, 3))] for _ in range(50)]
    recorder = Recorder()

    async def scenario(executor):
        batcher = make_batcher(
            recorder, executor, max_batch_size=4, max_delay_s=0.005, max_queue_size=256
        )
        batcher.start()
        try:
            return await asyncio.gather(
                *(batcher.submit(payloads, timeout=PATIENCE_S) for payloads in requests)
            )
        finally:
            await batcher.stop()

    with one_worker() as executor:
        results = asyncio.run(scenario(executor))

    assert results == [[x * 2 for x in payloads] for payloads in requests]
    assert sorted(recorder.seen) == sorted(x for payloads in requests for x in payloads)
    assert all(1 <= len(batch) <= 4 for batch in recorder.batches)


def test_concurrent_submissions_share_batches():
    recorder = Recorder()

    async def scenario(executor):
        batcher = make_batcher(
            recorder, executor, max_batch_size=8, max_delay_s=0.05, max_queue_size=64
        )
        batcher.start()
        try:
            results = await asyncio.gather(
                *(batcher.submit([i], timeout=PATIENCE_S) for i in range(20))
            )
        finally:
            await batcher.stop()
        return results, batcher.stats

    with one_worker() as executor:
        results, stats = asyncio.run(scenario(executor))

    assert results == [[i * 2] for i in range(20)]
    assert stats.largest_batch > 1
    assert len(recorder.batches) < 20
    assert stats.items == 20
    assert stats.batches == len(recorder.batches)


def test_a_lone_item_is_not_held_back_waiting_for_company():
    recorder = Recorder()

    async def scenario(executor):
        batcher = make_batcher(recorder, executor, max_batch_size=8, max_delay_s=0.05)
        batcher.start()
        try:
            # The timeout only turns a hang into a failure; it is not a speed claim.
            return await batcher.submit([21], timeout=1.5), batcher.stats
        finally:
            await batcher.stop()

    with one_worker() as executor:
        result, stats = asyncio.run(scenario(executor))

    assert result == [42]
    assert recorder.batches == [[21]]
    assert stats.largest_batch == 1


def test_a_batch_waits_up_to_max_delay_for_later_arrivals():
    recorder = Recorder()

    async def scenario(executor):
        batcher = make_batcher(recorder, executor, max_batch_size=2, max_delay_s=0.5)
        batcher.start()
        try:
            early = asyncio.create_task(batcher.submit([1], timeout=PATIENCE_S))
            await asyncio.sleep(0.02)  # well inside the first item's 0.5 s window
            late = asyncio.create_task(batcher.submit([2], timeout=PATIENCE_S))
            return await early, await late
        finally:
            await batcher.stop()

    with one_worker() as executor:
        results = asyncio.run(scenario(executor))

    assert results == ([2], [4])
    assert recorder.batches == [[1, 2]]


def test_a_full_batch_closes_without_waiting_for_max_delay():
    recorder = Recorder()

    async def scenario(executor):
        batcher = make_batcher(recorder, executor, max_batch_size=4, max_delay_s=30.0)
        batcher.start()
        try:
            # Were the batch to wait for its 30 s delay, this would raise DeadlineExceeded.
            return await batcher.submit([1, 2, 3, 4], timeout=PATIENCE_S)
        finally:
            await batcher.stop()

    with one_worker() as executor:
        result = asyncio.run(scenario(executor))

    assert result == [2, 4, 6, 8]
    assert recorder.batches == [[1, 2, 3, 4]]


def test_compute_runs_in_the_executor_thread_not_the_event_loop():
    recorder = Recorder()

    async def scenario(executor):
        batcher = make_batcher(recorder, executor)
        batcher.start()
        try:
            await batcher.submit([1, 2], timeout=PATIENCE_S)
            await batcher.submit([3], timeout=PATIENCE_S)
        finally:
            await batcher.stop()
        return threading.get_ident()

    with one_worker() as executor:
        worker_ident = executor.submit(threading.get_ident).result()
        loop_ident = asyncio.run(scenario(executor))

    assert recorder.threads == {worker_ident}
    assert loop_ident not in recorder.threads


# --- admission --------------------------------------------------------------------------------


def test_full_queue_rejects_at_once_and_queued_items_complete_afterwards():
    recorder = Recorder()

    async def scenario(executor):
        batcher = make_batcher(recorder, executor, max_batch_size=2, max_queue_size=4)
        gate = Gate(executor)
        batcher.start()
        try:
            first = await plug(batcher)
            queued = [
                asyncio.create_task(batcher.submit([i], timeout=PATIENCE_S)) for i in range(4)
            ]
            await eventually(lambda: batcher.depth == 4)
            with pytest.raises(QueueFull):
                await batcher.submit([99], timeout=PATIENCE_S)
            assert batcher.depth == 4
            gate.release()
            return await first, await asyncio.gather(*queued)
        finally:
            gate.release()
            await batcher.stop()

    with one_worker() as executor:
        first, queued = asyncio.run(scenario(executor))

    assert first == [2000]
    assert queued == [[0], [2], [4], [6]]
    assert 99 not in recorder.seen


def test_a_request_that_does_not_fit_enqueues_none_of_its_items():
    recorder = Recorder()

    async def scenario(executor):
        batcher = make_batcher(recorder, executor, max_batch_size=8, max_queue_size=4)
        gate = Gate(executor)
        batcher.start()
        try:
            first = await plug(batcher)
            waiting = asyncio.create_task(batcher.submit([1, 2, 3], timeout=PATIENCE_S))
            await eventually(lambda: batcher.depth == 3)
            with pytest.raises(QueueFull):
                await batcher.submit([7, 8], timeout=PATIENCE_S)
            depth_after_refusal = batcher.depth
            fits = asyncio.create_task(batcher.submit([4], timeout=PATIENCE_S))
            await eventually(lambda: batcher.depth == 4)
            gate.release()
            results = await first, await waiting, await fits
            return depth_after_refusal, results
        finally:
            gate.release()
            await batcher.stop()

    with one_worker() as executor:
        depth_after_refusal, results = asyncio.run(scenario(executor))

    assert depth_after_refusal == 3
    assert results == ([2000], [2, 4, 6], [8])
    assert 7 not in recorder.seen
    assert 8 not in recorder.seen


def test_more_items_than_the_queue_can_ever_hold_are_refused():
    recorder = Recorder()

    async def scenario(executor):
        batcher = make_batcher(recorder, executor, max_queue_size=4)
        batcher.start()
        try:
            with pytest.raises(TooManyItems):
                await batcher.submit([1, 2, 3, 4, 5], timeout=PATIENCE_S)
            depth = batcher.depth
            # Exactly max_queue_size items is still fine.
            result = await batcher.submit([1, 2, 3, 4], timeout=PATIENCE_S)
        finally:
            await batcher.stop()
        return depth, result

    with one_worker() as executor:
        depth, result = asyncio.run(scenario(executor))

    assert depth == 0
    assert result == [2, 4, 6, 8]
    assert 5 not in recorder.seen


def test_submit_before_start_is_refused():
    async def scenario(executor):
        batcher = make_batcher(Recorder(), executor)
        with pytest.raises(BatcherClosed):
            await batcher.submit([1], timeout=PATIENCE_S)
        return batcher.depth

    with one_worker() as executor:
        assert asyncio.run(scenario(executor)) == 0


@pytest.mark.parametrize(
    "options",
    [
        {"max_batch_size": 0},
        {"max_queue_size": 0},
        {"max_delay_s": -0.1},
    ],
    ids=["zero-batch", "zero-queue", "negative-delay"],
)
def test_nonsensical_limits_are_rejected(options):
    with one_worker() as executor, pytest.raises(ValueError):
        make_batcher(Recorder(), executor, **options)


# --- deadlines and cancellation ---------------------------------------------------------------


def test_timed_out_items_are_dropped_and_never_computed():
    recorder = Recorder()

    async def scenario(executor):
        batcher = make_batcher(recorder, executor)
        gate = Gate(executor)
        batcher.start()
        try:
            first = await plug(batcher)
            with pytest.raises(DeadlineExceeded):
                await batcher.submit([555], timeout=0.1)
            gate.release()
            await first
            after = await batcher.submit([3], timeout=PATIENCE_S)
            return after, batcher.depth
        finally:
            gate.release()
            await batcher.stop()

    with one_worker() as executor:
        after, depth = asyncio.run(scenario(executor))

    assert after == [6]
    assert depth == 0
    assert 555 not in recorder.seen
    assert recorder.seen == [1000, 3]


def test_cancelled_submit_drops_its_queued_items():
    recorder = Recorder()

    async def scenario(executor):
        batcher = make_batcher(recorder, executor)
        gate = Gate(executor)
        batcher.start()
        try:
            first = await plug(batcher)
            doomed = asyncio.create_task(batcher.submit([701, 702], timeout=PATIENCE_S))
            await eventually(lambda: batcher.depth == 2)
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            gate.release()
            await first
            # The next batch skips (and discards) the cancelled items.
            await eventually(lambda: batcher.depth == 0)
            after = await batcher.submit([5], timeout=PATIENCE_S)
            return after
        finally:
            gate.release()
            await batcher.stop()

    with one_worker() as executor:
        after = asyncio.run(scenario(executor))

    assert after == [10]
    assert 701 not in recorder.seen
    assert 702 not in recorder.seen


def test_items_abandoned_while_their_batch_gathers_are_not_computed():
    recorder = Recorder()

    async def scenario(executor):
        batcher = make_batcher(recorder, executor, max_batch_size=8, max_delay_s=0.3)
        batcher.start()
        try:
            keeper = asyncio.create_task(batcher.submit([1], timeout=PATIENCE_S))
            await eventually(lambda: batcher.depth == 0)  # the batch has started gathering
            with pytest.raises(DeadlineExceeded):
                await batcher.submit([2], timeout=0.05)  # joins that batch, then gives up
            return await keeper
        finally:
            await batcher.stop()

    with one_worker() as executor:
        kept = asyncio.run(scenario(executor))

    assert kept == [2]
    assert recorder.batches == [[1]]


def test_cancelled_items_free_their_queue_slots():
    recorder = Recorder()

    async def scenario(executor):
        batcher = make_batcher(recorder, executor, max_queue_size=2)
        gate = Gate(executor)
        batcher.start()
        try:
            first = await plug(batcher)
            doomed = asyncio.create_task(batcher.submit([701, 702], timeout=PATIENCE_S))
            await eventually(lambda: batcher.depth == 2)
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            # The queue still holds the two dead items, but they are pruned to make room.
            replacement = asyncio.create_task(batcher.submit([8, 9], timeout=PATIENCE_S))
            await eventually(lambda: batcher.depth == 2)
            gate.release()
            return await first, await replacement
        finally:
            gate.release()
            await batcher.stop()

    with one_worker() as executor:
        first, replacement = asyncio.run(scenario(executor))

    assert first == [2000]
    assert replacement == [16, 18]
    assert 701 not in recorder.seen
    assert 702 not in recorder.seen


# --- failures ---------------------------------------------------------------------------------


def poison_aware(payloads: list[Any]) -> list[Any]:
    if "poison" in payloads:
        raise ValueError("poison in the batch")
    return [f"ok:{p}" for p in payloads]


def test_a_failing_batch_fails_only_its_own_callers():
    recorder = Recorder(poison_aware)

    async def scenario(executor):
        batcher = make_batcher(recorder, executor, max_batch_size=1)
        batcher.start()
        try:
            outcomes = await asyncio.gather(
                batcher.submit(["a"], timeout=PATIENCE_S),
                batcher.submit(["poison"], timeout=PATIENCE_S),
                batcher.submit(["b"], timeout=PATIENCE_S),
                return_exceptions=True,
            )
            later = await batcher.submit(["c"], timeout=PATIENCE_S)
        finally:
            await batcher.stop()
        return outcomes, later, batcher.stats

    with one_worker() as executor:
        outcomes, later, stats = asyncio.run(scenario(executor))

    assert outcomes[0] == ["ok:a"]
    assert isinstance(outcomes[1], BatchFailed)
    assert "poison in the batch" in str(outcomes[1])
    assert outcomes[2] == ["ok:b"]
    assert later == ["ok:c"]
    assert stats.failed_batches == 1
    assert stats.batches == 3
    assert stats.items == 3


def test_every_caller_in_a_failed_batch_gets_batch_failed_and_it_is_logged_once(caplog):
    recorder = Recorder(poison_aware)

    async def scenario(executor):
        batcher = make_batcher(recorder, executor, max_batch_size=8)
        gate = Gate(executor)
        batcher.start()
        try:
            first = await plug(batcher)
            victims = [
                asyncio.create_task(batcher.submit(payloads, timeout=PATIENCE_S))
                for payloads in (["x", "y"], ["poison"], ["z"])
            ]
            await eventually(lambda: batcher.depth == 4)
            gate.release()
            ok = await first
            outcomes = await asyncio.gather(*victims, return_exceptions=True)
            later = await batcher.submit(["after"], timeout=PATIENCE_S)
        finally:
            gate.release()
            await batcher.stop()
        return ok, outcomes, later, batcher.stats

    with caplog.at_level(logging.ERROR, logger="evalserve.batching"), one_worker() as executor:
        ok, outcomes, later, stats = asyncio.run(scenario(executor))

    assert ok == ["ok:1000"]
    assert all(isinstance(outcome, BatchFailed) for outcome in outcomes)
    assert later == ["ok:after"]
    assert recorder.batches[1] == ["x", "y", "poison", "z"]
    assert stats.failed_batches == 1
    failures = [r for r in caplog.records if r.name == "evalserve.batching"]
    assert len(failures) == 1
    assert failures[0].levelno == logging.ERROR
    assert failures[0].exc_info is not None
    assert isinstance(failures[0].exc_info[1], ValueError)


def test_a_request_whose_first_batch_failed_has_its_other_items_dropped():
    recorder = Recorder(poison_aware)

    async def scenario(executor):
        batcher = make_batcher(recorder, executor, max_batch_size=2, max_delay_s=0.05)
        batcher.start()
        try:
            with pytest.raises(BatchFailed):
                await batcher.submit(["a", "poison", "b"], timeout=PATIENCE_S)
            later = await batcher.submit(["c"], timeout=PATIENCE_S)
        finally:
            await batcher.stop()
        return later

    with one_worker() as executor:
        later = asyncio.run(scenario(executor))

    assert later == ["ok:c"]
    assert recorder.batches[0] == ["a", "poison"]
    # "b" was still queued when its request failed: nobody is left to receive its result.
    assert "b" not in recorder.seen


def test_a_compute_returning_the_wrong_number_of_results_fails_the_batch():
    recorder = Recorder(lambda xs: [*xs, "extra"])

    async def scenario(executor):
        batcher = make_batcher(recorder, executor, max_batch_size=4)
        batcher.start()
        try:
            with pytest.raises(BatchFailed):
                await batcher.submit([1, 2], timeout=PATIENCE_S)
        finally:
            await batcher.stop()
        return batcher.stats

    with one_worker() as executor:
        stats = asyncio.run(scenario(executor))

    assert recorder.batches == [[1, 2]]
    assert stats.failed_batches == 1
    assert stats.batches == 0
    assert stats.items == 0


# --- shutdown ---------------------------------------------------------------------------------


def test_stop_finishes_queued_items_then_refuses_new_ones():
    recorder = Recorder()

    async def scenario(executor):
        batcher = make_batcher(recorder, executor, max_batch_size=2, max_delay_s=10.0)
        gate = Gate(executor)
        batcher.start()
        try:
            first = await plug(batcher, [1000, 1001])  # a full batch: no 10 s wait
            queued = [
                asyncio.create_task(batcher.submit([i], timeout=PATIENCE_S)) for i in range(5)
            ]
            await eventually(lambda: batcher.depth == 5)
            stopping = asyncio.create_task(batcher.stop())
            await asyncio.sleep(0.01)
            with pytest.raises(BatcherClosed):
                await batcher.submit([42], timeout=PATIENCE_S)
            gate.release()
            await stopping
            results = await first, await asyncio.gather(*queued)
            with pytest.raises(BatcherClosed):
                await batcher.submit([43], timeout=PATIENCE_S)
            return results, batcher.depth
        finally:
            gate.release()
            await batcher.stop()

    with one_worker() as executor:
        (first, queued), depth = asyncio.run(scenario(executor))

    assert first == [2000, 2002]
    assert queued == [[0], [2], [4], [6], [8]]
    assert depth == 0
    assert 42 not in recorder.seen
    assert 43 not in recorder.seen
