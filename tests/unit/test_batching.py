"""The dynamic batcher, driven with plain Python compute functions (no torch, no HTTP).

Every test runs its batcher through ``running_batcher``: a one-worker ThreadPoolExecutor, as a
model has, a started batcher, and on exit a stop that must finish what was queued. To hold items in
the queue, a test parks that worker on a ``Gate`` and lets the batcher take one "plug" batch out
of the queue: that batch then waits for the worker, and everything submitted afterwards stays
queued until the gate opens.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import pytest

from app.batching import (
    Batcher,
    BatcherClosed,
    BatcherDead,
    BatchFailed,
    DeadlineExceeded,
    QueueFull,
    TooManyItems,
)

# Long enough never to fire in a passing test; only there so a broken batcher fails, not hangs.
PATIENCE_S = 2.0
# The executor's thread names are "<prefix>_<n>"; compute must run on that one thread.
WORKER_PREFIX = "test-model"


class Recorder:
    """A compute function that remembers every batch (and thread) it was called with."""

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]] | None = None) -> None:
        self.fn = fn or (lambda xs: [x * 2 for x in xs])
        self.batches: list[list[Any]] = []
        self.threads: set[threading.Thread] = set()

    def __call__(self, payloads: list[Any]) -> Sequence[Any]:
        self.batches.append(list(payloads))
        self.threads.add(threading.current_thread())
        return self.fn(payloads)

    @property
    def seen(self) -> list[Any]:
        return [payload for batch in self.batches for payload in batch]


class Gate:
    """Parks a batcher's only worker thread (see ``running_batcher``) until ``release()``."""

    def __init__(self) -> None:
        self._open = threading.Event()

    def park(self, executor: ThreadPoolExecutor) -> None:
        executor.submit(self._open.wait, 5.0)

    def release(self) -> None:
        self._open.set()


def make_batcher(compute: Callable[[list[Any]], Sequence[Any]], executor, **options) -> Batcher:
    settings: dict[str, Any] = {
        "max_batch_size": 4,
        "max_delay_s": 0.0,
        "max_queue_size": 16,
        "name": "test",
    }
    settings.update(options)
    return Batcher(compute, executor, **settings)


@asynccontextmanager
async def running_batcher(
    compute: Callable[[list[Any]], Sequence[Any]] | None = None,
    *,
    gate: Gate | None = None,
    **options: Any,
) -> AsyncIterator[Batcher]:
    """A started batcher over its own one-worker executor (parked on ``gate``, if given).

    On exit the gate opens, the batcher stops (finishing what is queued), and the worker is
    joined, whether the test passed or not.
    """
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=WORKER_PREFIX)
    try:
        if gate is not None:
            gate.park(executor)
        batcher = make_batcher(compute or Recorder(), executor, **options)
        batcher.start()
        try:
            yield batcher
        finally:
            if gate is not None:
                gate.release()
            await batcher.stop()
    finally:
        executor.shutdown(wait=True)


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

    async def scenario():
        async with running_batcher(
            recorder, max_batch_size=4, max_delay_s=0.005, max_queue_size=256
        ) as batcher:
            return await asyncio.gather(
                *(batcher.submit(payloads, timeout=PATIENCE_S) for payloads in requests)
            )

    results = asyncio.run(scenario())

    assert results == [[x * 2 for x in payloads] for payloads in requests]
    assert sorted(recorder.seen) == sorted(x for payloads in requests for x in payloads)
    assert all(1 <= len(batch) <= 4 for batch in recorder.batches)


def test_concurrent_submissions_share_batches():
    recorder = Recorder()

    async def scenario():
        async with running_batcher(
            recorder, max_batch_size=8, max_delay_s=0.05, max_queue_size=64
        ) as batcher:
            results = await asyncio.gather(
                *(batcher.submit([i], timeout=PATIENCE_S) for i in range(20))
            )
        return results, batcher.stats

    results, stats = asyncio.run(scenario())

    assert results == [[i * 2] for i in range(20)]
    assert stats.largest_batch > 1
    assert len(recorder.batches) < 20
    assert stats.items == 20
    assert stats.batches == len(recorder.batches)


def test_a_lone_item_is_not_held_back_waiting_for_company():
    # close_when_idle with nothing announced: nobody else is coming, so the batch closes at once
    # instead of sleeping out its delay. The delay is long enough that a batcher that waits
    # cannot pass; the timeout is longer still, so such a batcher fails on the time below.
    delay = 5.0
    recorder = Recorder()

    async def scenario():
        async with running_batcher(
            recorder, max_batch_size=8, max_delay_s=delay, close_when_idle=True
        ) as batcher:
            began = time.perf_counter()
            result = await batcher.submit([21], timeout=2 * delay)
            return result, time.perf_counter() - began, batcher.stats

    result, elapsed, stats = asyncio.run(scenario())

    assert result == [42]
    assert elapsed < delay / 5, f"a lone item waited {elapsed:.2f}s of the {delay}s delay"
    assert recorder.batches == [[21]]
    assert stats.largest_batch == 1


def test_without_close_when_idle_a_lone_item_waits_for_the_delay():
    async def scenario():
        async with running_batcher(max_batch_size=8, max_delay_s=0.3) as batcher:
            began = time.perf_counter()
            result = await batcher.submit([1], timeout=PATIENCE_S)
            return result, time.perf_counter() - began

    result, elapsed = asyncio.run(scenario())

    assert result == [2]
    assert elapsed >= 0.3


def test_a_batch_waits_up_to_max_delay_for_later_arrivals():
    recorder = Recorder()

    async def scenario():
        async with running_batcher(recorder, max_batch_size=2, max_delay_s=0.5) as batcher:
            early = asyncio.create_task(batcher.submit([1], timeout=PATIENCE_S))
            await asyncio.sleep(0.02)  # well inside the first item's 0.5 s window
            late = asyncio.create_task(batcher.submit([2], timeout=PATIENCE_S))
            return await early, await late

    results = asyncio.run(scenario())

    assert results == ([2], [4])
    assert recorder.batches == [[1, 2]]


def test_a_full_batch_closes_without_waiting_for_max_delay():
    recorder = Recorder()

    async def scenario():
        async with running_batcher(recorder, max_batch_size=4, max_delay_s=30.0) as batcher:
            # Were the batch to wait for its 30 s delay, this would raise DeadlineExceeded.
            return await batcher.submit([1, 2, 3, 4], timeout=PATIENCE_S)

    result = asyncio.run(scenario())

    assert result == [2, 4, 6, 8]
    assert recorder.batches == [[1, 2, 3, 4]]


def test_compute_runs_in_the_executor_thread_not_the_event_loop():
    recorder = Recorder()

    async def scenario():
        async with running_batcher(recorder) as batcher:
            await batcher.submit([1, 2], timeout=PATIENCE_S)
            await batcher.submit([3], timeout=PATIENCE_S)
        return threading.current_thread()

    loop_thread = asyncio.run(scenario())

    assert recorder.batches == [[1, 2], [3]]
    assert [thread.name for thread in recorder.threads] == [f"{WORKER_PREFIX}_0"]
    assert loop_thread not in recorder.threads


# --- close_when_idle: a gathering batch waits for announced arrivals only ----------------------


def test_a_batch_waits_for_announced_arrivals_and_takes_them():
    async def scenario():
        async with running_batcher(
            max_batch_size=8, max_delay_s=5.0, max_queue_size=64, close_when_idle=True
        ) as batcher:
            arrival = batcher.announce(2)  # two items are "decoding"
            first = asyncio.create_task(batcher.submit([1], timeout=PATIENCE_S * 5))
            await asyncio.sleep(0.2)  # the batch is gathering: it must wait for them
            assert not first.done()
            second = batcher.submit([2, 3], timeout=PATIENCE_S * 5, arrival=arrival)
            assert await second == [4, 6]
            assert await first == [2]
        return batcher.stats

    stats = asyncio.run(scenario())

    assert stats.batches == 1
    assert stats.largest_batch == 3


def test_a_cancelled_arrival_releases_the_waiting_batch():
    async def scenario():
        async with running_batcher(
            max_batch_size=8, max_delay_s=5.0, max_queue_size=64, close_when_idle=True
        ) as batcher:
            arrival = batcher.announce(1)
            first = asyncio.create_task(batcher.submit([5], timeout=PATIENCE_S * 5))
            await asyncio.sleep(0.1)
            assert not first.done()
            arrival.cancel()  # e.g. its image failed to decode
            arrival.cancel()  # idempotent
            # Well inside the 5 s delay: the batch closed because nothing is expected any more.
            return await asyncio.wait_for(first, PATIENCE_S)

    assert asyncio.run(scenario()) == [10]


# --- admission --------------------------------------------------------------------------------


def test_full_queue_rejects_at_once_and_queued_items_complete_afterwards():
    recorder = Recorder()
    gate = Gate()

    async def scenario():
        async with running_batcher(
            recorder, gate=gate, max_batch_size=2, max_queue_size=4
        ) as batcher:
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

    first, queued = asyncio.run(scenario())

    assert first == [2000]
    assert queued == [[0], [2], [4], [6]]
    assert 99 not in recorder.seen


def test_a_request_that_does_not_fit_enqueues_none_of_its_items():
    recorder = Recorder()
    gate = Gate()

    async def scenario():
        async with running_batcher(
            recorder, gate=gate, max_batch_size=8, max_queue_size=4
        ) as batcher:
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

    depth_after_refusal, results = asyncio.run(scenario())

    assert depth_after_refusal == 3
    assert results == ([2000], [2, 4, 6], [8])
    assert 7 not in recorder.seen
    assert 8 not in recorder.seen


def test_more_items_than_the_queue_can_ever_hold_are_refused():
    recorder = Recorder()

    async def scenario():
        async with running_batcher(recorder, max_queue_size=4) as batcher:
            with pytest.raises(TooManyItems):
                await batcher.submit([1, 2, 3, 4, 5], timeout=PATIENCE_S)
            depth = batcher.depth
            # Exactly max_queue_size items is still fine.
            result = await batcher.submit([1, 2, 3, 4], timeout=PATIENCE_S)
        return depth, result

    depth, result = asyncio.run(scenario())

    assert depth == 0
    assert result == [2, 4, 6, 8]
    assert 5 not in recorder.seen


def test_submit_before_start_is_refused():
    recorder = Recorder()

    async def scenario(executor):
        batcher = make_batcher(recorder, executor)
        with pytest.raises(BatcherClosed):
            await batcher.submit([1], timeout=PATIENCE_S)
        return batcher.depth

    with ThreadPoolExecutor(max_workers=1) as executor:
        assert asyncio.run(scenario(executor)) == 0
    assert recorder.batches == []


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
    with (
        ThreadPoolExecutor(max_workers=1) as executor,
        pytest.raises(ValueError, match="must be >= 1"),
    ):
        make_batcher(Recorder(), executor, **options)


# --- deadlines and cancellation ---------------------------------------------------------------


def test_timed_out_items_are_dropped_and_never_computed():
    recorder = Recorder()
    gate = Gate()

    async def scenario():
        async with running_batcher(recorder, gate=gate) as batcher:
            first = await plug(batcher)
            with pytest.raises(DeadlineExceeded):
                await batcher.submit([555], timeout=0.1)
            gate.release()
            await first
            after = await batcher.submit([3], timeout=PATIENCE_S)
            return after, batcher.depth

    after, depth = asyncio.run(scenario())

    assert after == [6]
    assert depth == 0
    assert 555 not in recorder.seen
    assert recorder.seen == [1000, 3]


def test_cancelled_submit_drops_its_queued_items():
    recorder = Recorder()
    gate = Gate()

    async def scenario():
        async with running_batcher(recorder, gate=gate) as batcher:
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
            return await batcher.submit([5], timeout=PATIENCE_S)

    after = asyncio.run(scenario())

    assert after == [10]
    assert 701 not in recorder.seen
    assert 702 not in recorder.seen


def test_items_abandoned_while_their_batch_gathers_are_not_computed():
    recorder = Recorder()

    async def scenario():
        async with running_batcher(recorder, max_batch_size=8, max_delay_s=0.3) as batcher:
            keeper = asyncio.create_task(batcher.submit([1], timeout=PATIENCE_S))
            await eventually(lambda: batcher.depth == 0)  # the batch has started gathering
            with pytest.raises(DeadlineExceeded):
                await batcher.submit([2], timeout=0.05)  # joins that batch, then gives up
            return await keeper

    kept = asyncio.run(scenario())

    assert kept == [2]
    assert recorder.batches == [[1]]


def test_cancelled_items_free_their_queue_slots():
    recorder = Recorder()
    gate = Gate()

    async def scenario():
        async with running_batcher(recorder, gate=gate, max_queue_size=2) as batcher:
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

    first, replacement = asyncio.run(scenario())

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

    async def scenario():
        async with running_batcher(recorder, max_batch_size=1) as batcher:
            outcomes = await asyncio.gather(
                batcher.submit(["a"], timeout=PATIENCE_S),
                batcher.submit(["poison"], timeout=PATIENCE_S),
                batcher.submit(["b"], timeout=PATIENCE_S),
                return_exceptions=True,
            )
            later = await batcher.submit(["c"], timeout=PATIENCE_S)
        return outcomes, later, batcher.stats

    outcomes, later, stats = asyncio.run(scenario())

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
    gate = Gate()

    async def scenario():
        async with running_batcher(recorder, gate=gate, max_batch_size=8) as batcher:
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
        return ok, outcomes, later, batcher.stats

    with caplog.at_level(logging.ERROR, logger="evalserve.batching"):
        ok, outcomes, later, stats = asyncio.run(scenario())

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

    async def scenario():
        async with running_batcher(recorder, max_batch_size=2, max_delay_s=0.05) as batcher:
            with pytest.raises(BatchFailed):
                await batcher.submit(["a", "poison", "b"], timeout=PATIENCE_S)
            return await batcher.submit(["c"], timeout=PATIENCE_S)

    later = asyncio.run(scenario())

    assert later == ["ok:c"]
    assert recorder.batches[0] == ["a", "poison"]
    # "b" was still queued when its request failed: nobody is left to receive its result.
    assert "b" not in recorder.seen


def test_a_compute_returning_the_wrong_number_of_results_fails_the_batch():
    recorder = Recorder(lambda xs: [*xs, "extra"])

    async def scenario():
        async with running_batcher(recorder, max_batch_size=4) as batcher:
            with pytest.raises(BatchFailed):
                await batcher.submit([1, 2], timeout=PATIENCE_S)
        return batcher.stats

    stats = asyncio.run(scenario())

    assert recorder.batches == [[1, 2]]
    assert stats.failed_batches == 1
    assert stats.batches == 0
    assert stats.items == 0


class ExplodingObserver:
    """Raises from both hooks, as a buggy metrics exporter would (the BatchObserver protocol's
    arguments are unused on purpose)."""

    def batch_done(self, queue_seconds: Sequence[float], compute_seconds: float) -> None:  # noqa: ARG002
        raise RuntimeError("observer exploded")

    def batch_failed(self, size: int) -> None:  # noqa: ARG002
        raise RuntimeError("observer exploded")


def test_a_raising_observer_is_logged_and_every_batch_is_still_answered(caplog):
    async def scenario():
        async with running_batcher(max_batch_size=2, observer=ExplodingObserver()) as batcher:
            results = [await batcher.submit([i], timeout=PATIENCE_S) for i in range(3)]
            return results, batcher.alive

    results, alive = asyncio.run(scenario())

    assert results == [[0], [2], [4]]
    assert alive
    failures = [r for r in caplog.records if "observer failed" in r.getMessage()]
    assert len(failures) == 3
    assert all(r.exc_info for r in failures)


def test_a_dead_loop_fails_its_items_at_once_refuses_new_ones_and_tells_its_owner(
    monkeypatch, caplog
):
    original = Batcher._collect
    calls = 0

    async def collect_then_break(self):
        nonlocal calls
        calls += 1
        if calls == 2:
            await asyncio.sleep(0.05)  # let the second caller queue its item first
            raise RuntimeError("injected fault in the batch loop")
        return await original(self)

    monkeypatch.setattr(Batcher, "_collect", collect_then_break)
    deaths: list[BaseException] = []

    async def scenario():
        async with running_batcher(max_batch_size=1, on_death=deaths.append) as batcher:
            first = await batcher.submit([1], timeout=PATIENCE_S)
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(BatcherDead) as stranded:
                await batcher.submit([2], timeout=PATIENCE_S)
            waited = loop.time() - began
            with pytest.raises(BatcherDead):
                await batcher.submit([3], timeout=PATIENCE_S)
        return first, stranded.value, waited, batcher

    first, stranded, waited, batcher = asyncio.run(scenario())

    assert first == [2]
    assert isinstance(stranded, BatcherDead)
    # The stranded caller is told at once, not after its timeout.
    assert waited < PATIENCE_S / 2
    assert not batcher.alive
    assert [str(d) for d in deaths] == ["injected fault in the batch loop"]
    [record] = [r for r in caplog.records if "batch loop died" in r.getMessage()]
    assert record.levelno == logging.CRITICAL
    assert record.exc_info is not None


# --- shutdown ---------------------------------------------------------------------------------


def test_stop_finishes_queued_items_then_refuses_new_ones():
    recorder = Recorder()
    gate = Gate()

    async def scenario():
        async with running_batcher(
            recorder, gate=gate, max_batch_size=2, max_delay_s=10.0
        ) as batcher:
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

    (first, queued), depth = asyncio.run(scenario())

    assert first == [2000, 2002]
    assert queued == [[0], [2], [4], [6], [8]]
    assert depth == 0
    assert 42 not in recorder.seen
    assert 43 not in recorder.seen
