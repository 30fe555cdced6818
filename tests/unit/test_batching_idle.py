"""close_when_idle: a gathering batch waits for announced arrivals only, never for nobody."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from app.batching import Batcher


def double(items: list[int]) -> list[int]:
    return [2 * item for item in items]


def make(pool: ThreadPoolExecutor, **options: object) -> Batcher[int, int]:
    return Batcher(double, pool, max_batch_size=8, max_delay_s=5.0, max_queue_size=64, **options)  # type: ignore[arg-type]


def test_a_lone_item_does_not_wait_out_the_delay_when_nothing_is_announced() -> None:
    async def scenario() -> float:
        with ThreadPoolExecutor(1) as pool:
            batcher = make(pool, close_when_idle=True)
            batcher.start()
            began = time.perf_counter()
            assert await batcher.submit([21], timeout=30) == [42]
            elapsed = time.perf_counter() - began
            await batcher.stop()
            return elapsed

    # The delay is 5 s; closing at once takes milliseconds (2 s only guards against a hang).
    assert asyncio.run(scenario()) < 2.0


def test_without_close_when_idle_a_lone_item_waits_for_the_delay() -> None:
    async def scenario() -> bool:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(double, pool, max_batch_size=8, max_delay_s=0.3, max_queue_size=8)
            batcher.start()
            began = time.perf_counter()
            await batcher.submit([1], timeout=30)
            waited = time.perf_counter() - began >= 0.3
            await batcher.stop()
            return waited

    assert asyncio.run(scenario())


def test_a_batch_waits_for_announced_arrivals_and_takes_them() -> None:
    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = make(pool, close_when_idle=True)
            batcher.start()
            arrival = batcher.announce(2)  # two items are "decoding"
            first = asyncio.create_task(batcher.submit([1], timeout=30))
            await asyncio.sleep(0.2)  # the batch is gathering: it must wait for them
            assert not first.done()
            second = batcher.submit([2, 3], timeout=30, arrival=arrival)
            assert await second == [4, 6]
            assert await first == [2]
            assert batcher.stats.batches == 1 and batcher.stats.largest_batch == 3
            await batcher.stop()

    asyncio.run(scenario())


def test_a_cancelled_arrival_releases_the_waiting_batch() -> None:
    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = make(pool, close_when_idle=True)
            batcher.start()
            arrival = batcher.announce(1)
            first = asyncio.create_task(batcher.submit([5], timeout=30))
            await asyncio.sleep(0.1)
            assert not first.done()
            arrival.cancel()  # e.g. its image failed to decode
            arrival.cancel()  # idempotent
            assert await asyncio.wait_for(first, 2.0) == [10]
            await batcher.stop()

    asyncio.run(scenario())
