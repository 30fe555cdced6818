"""The batcher's two-step batches (``stage`` then ``compute``), as a GPU model runs them: the
next batch is staged while this one computes, never two compute at once, and every item is
answered with its own result. Plain functions and threads, no torch, no HTTP; the steps block
on events, not on time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import pytest

from app.batching import Batcher, BatchFailed, BatchTooLarge
from app.values import OutOfMemory


class Steps:
    """stage and compute of integers: staging tags a batch, computing answers each item with
    its square (or, for a negative item, a ValueError of its own)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, tuple[int, ...]]] = []
        self.computing = 0
        self.most_computing = 0
        self.overlapped = False
        self.second_staged = threading.Event()
        self.stage_executor = ThreadPoolExecutor(1, thread_name_prefix="stage")
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="compute")

    def stage(self, items: list[int]) -> tuple[str, list[int]]:
        with self.lock:
            self.log.append(("stage", tuple(items)))
            if sum(1 for step, _ in self.log if step == "stage") == 2:
                self.second_staged.set()
        return "staged", items

    def compute(self, staged: tuple[str, list[int]]) -> Sequence[int | Exception]:
        tag, items = staged
        assert tag == "staged"
        with self.lock:
            self.computing += 1
            self.most_computing = max(self.most_computing, self.computing)
            self.log.append(("compute", tuple(items)))
            first = sum(1 for step, _ in self.log if step == "compute") == 1
        if first:
            # The first batch computes until the second has been staged beside it (or gives up
            # waiting, and says so).
            self.overlapped = self.second_staged.wait(10)
        with self.lock:
            self.computing -= 1
        return [ValueError(f"item {i}") if i < 0 else i * i for i in items]

    def batcher(self, **options: object) -> Batcher[int, int]:
        return Batcher(
            self.compute,
            self.executor,
            stage=self.stage,
            stage_executor=self.stage_executor,
            max_batch_size=4,
            max_delay_s=0.0,
            max_queue_size=64,
            **options,  # type: ignore[arg-type]
        )


def test_the_next_batch_is_staged_while_one_computes_and_every_item_gets_its_result() -> None:
    steps = Steps()

    async def main() -> list[list[int]]:
        batcher = steps.batcher()
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([1, 2, 3, 4], 30))
        await asyncio.sleep(0)
        later = [asyncio.ensure_future(batcher.submit([n, n + 1], 30)) for n in (10, 20, 30)]
        answers = await asyncio.gather(first, *later)
        await batcher.stop()
        return answers

    answers = asyncio.run(main())
    assert answers == [[1, 4, 9, 16], [100, 121], [400, 441], [900, 961]]
    # The second batch was staged while the first computed (its compute waited for that).
    assert steps.overlapped
    assert steps.log[0] == ("stage", (1, 2, 3, 4))
    assert steps.log.index(("compute", (1, 2, 3, 4))) < 3
    assert steps.most_computing == 1  # one compute at a time, whatever the overlap
    staged = [items for step, items in steps.log if step == "stage"]
    computed = [items for step, items in steps.log if step == "compute"]
    assert staged == computed  # each batch computed once, in the order it was staged


def test_an_item_answered_with_an_error_fails_alone() -> None:
    steps = Steps()
    steps.second_staged.set()

    async def main() -> tuple[list[object], list[int]]:
        batcher = steps.batcher()
        batcher.start()
        bad, good = await asyncio.gather(
            batcher.submit([5, -1], 30), batcher.submit([6], 30), return_exceptions=True
        )
        await batcher.stop()
        assert batcher.stats.batches == 1
        assert batcher.stats.failed_batches == 0
        return [bad], good  # type: ignore[return-value]

    (bad,), good = asyncio.run(main())
    assert isinstance(bad, ValueError)
    assert str(bad) == "item -1"
    assert good == [36]


@asynccontextmanager
async def two_steps(
    stage: Callable[[list[int]], list[int]],
    compute: Callable[[list[int]], Sequence[int]],
    **options: Any,
) -> AsyncIterator[Batcher[int, int]]:
    """A started batcher of ``stage`` then ``compute``, each in a thread of its own, batches of
    at most 4 closed at once, stopped on exit."""
    with ThreadPoolExecutor(1) as stager, ThreadPoolExecutor(1) as worker:
        batcher: Batcher[int, int] = Batcher(
            compute,
            worker,
            stage=stage,
            stage_executor=stager,
            max_batch_size=4,
            max_queue_size=8,
            **{"max_delay_s": 0.0, **options},
        )
        batcher.start()
        try:
            yield batcher
        finally:
            await batcher.stop()


def test_a_batch_out_of_memory_in_its_staging_is_staged_again_as_two_halves() -> None:
    staged_sizes: list[int] = []

    def stage(items: list[int]) -> list[int]:
        staged_sizes.append(len(items))
        if len(items) > 2:
            raise OutOfMemory("staging 4 images did not fit")
        return items

    def plus_one(items: list[int]) -> list[int]:
        return [i + 1 for i in items]

    async def main() -> list[int]:
        async with two_steps(stage, plus_one, max_delay_s=0.5, split_on=OutOfMemory) as batcher:
            answers = await batcher.submit([1, 2, 3, 4], 30)
        assert batcher.stats.split_batches == 1
        return answers

    assert asyncio.run(main()) == [2, 3, 4, 5]
    assert staged_sizes == [4, 2, 2]


def test_a_staging_failure_fails_its_batch_and_serving_goes_on() -> None:
    def stage(items: list[int]) -> list[int]:
        if 13 in items:
            raise RuntimeError("unlucky batch")
        return items

    async def main() -> tuple[BaseException | list[int], list[int]]:
        async with two_steps(stage, list) as batcher:
            failed = await asyncio.gather(batcher.submit([13], 30), return_exceptions=True)
            after = await batcher.submit([7], 30)
        return failed[0], after

    failed, after = asyncio.run(main())
    assert isinstance(failed, BatchFailed)
    assert after == [7]


def test_stage_needs_its_executor() -> None:
    with pytest.raises(ValueError, match="go together"):
        Batcher(lambda items: items, ThreadPoolExecutor(1), stage=lambda items: items,
                max_batch_size=1, max_delay_s=0, max_queue_size=1)  # fmt: skip


def test_a_lone_item_too_large_even_alone_is_refused_after_staging_once() -> None:
    calls: list[int] = []

    def stage(items: list[int]) -> list[int]:
        calls.append(len(items))
        raise OutOfMemory("never fits")

    async def main() -> BaseException | list[int]:
        async with two_steps(stage, list, split_on=OutOfMemory) as batcher:
            (result,) = await asyncio.gather(batcher.submit([1], 30), return_exceptions=True)
        return result

    assert isinstance(asyncio.run(main()), BatchTooLarge)
    assert calls == [1]
