"""A batcher whose observer fails, or whose loop dies, never leaves its callers waiting out
their timeouts: observer failures are logged and the batch still answered; a dead loop is
logged with its traceback, fails every item it held, refuses new ones, and tells its owner."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.batching import Batcher, BatcherDead

# Far longer than any answer takes: a caller that waits this long was left hanging.
PATIENCE_S = 5.0


def double(items: list[int]) -> list[int]:
    return [2 * item for item in items]


class ExplodingObserver:
    """Raises from both hooks, as a buggy metrics exporter would."""

    def batch_done(self, queue_seconds: Sequence[float], compute_seconds: float) -> None:
        raise RuntimeError("observer exploded")

    def batch_failed(self, size: int) -> None:
        raise RuntimeError("observer exploded")


def test_a_raising_observer_is_logged_and_every_batch_is_still_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> tuple[list[list[int]], bool]:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(
                double,
                pool,
                max_batch_size=2,
                max_delay_s=0.0,
                max_queue_size=16,
                observer=ExplodingObserver(),
            )
            batcher.start()
            results = [await batcher.submit([i], timeout=PATIENCE_S) for i in range(3)]
            alive = batcher.alive
            await batcher.stop()
            return results, alive

    results, alive = asyncio.run(scenario())
    assert results == [[0], [2], [4]]
    assert alive
    failures = [r for r in caplog.records if "observer failed" in r.getMessage()]
    assert len(failures) == 3 and all(r.exc_info for r in failures)


def test_a_dead_loop_fails_its_items_at_once_refuses_new_ones_and_tells_its_owner(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original = Batcher._collect
    calls = 0

    async def collect_then_break(self: Batcher[int, int]) -> object:
        nonlocal calls
        calls += 1
        if calls == 2:
            await asyncio.sleep(0.05)  # let the second caller queue its item first
            raise RuntimeError("injected fault in the batch loop")
        return await original(self)

    monkeypatch.setattr(Batcher, "_collect", collect_then_break)
    deaths: list[BaseException] = []

    async def scenario() -> tuple[list[int], BaseException, float, Batcher[int, int]]:
        with ThreadPoolExecutor(1) as pool:
            batcher: Batcher[int, int] = Batcher(
                double,
                pool,
                max_batch_size=1,
                max_delay_s=0.0,
                max_queue_size=16,
                on_death=deaths.append,
            )
            batcher.start()
            first = await batcher.submit([1], timeout=PATIENCE_S)
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(BatcherDead) as stranded:
                await batcher.submit([2], timeout=PATIENCE_S)
            waited = loop.time() - began
            with pytest.raises(BatcherDead):
                await batcher.submit([3], timeout=PATIENCE_S)
            await batcher.stop()
            return first, stranded.value, waited, batcher

    first, stranded, waited, batcher = asyncio.run(scenario())
    assert first == [2]
    assert isinstance(stranded, BatcherDead)
    # The stranded caller is told at once, not after its 5 s timeout.
    assert waited < PATIENCE_S / 2
    assert not batcher.alive
    assert [str(d) for d in deaths] == ["injected fault in the batch loop"]
    [record] = [r for r in caplog.records if "batch loop died" in r.getMessage()]
    assert record.levelno == logging.CRITICAL and record.exc_info is not None
