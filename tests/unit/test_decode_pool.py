"""The decode pool on its own (no HTTP, no images): requests take turns, and a job whose caller
has gone never starts. Each test runs its scenario with ``asyncio.run``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from app.preprocessing import DecodePool


class Gate:
    """Jobs that record the order they start in and wait until the test opens the gate."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.lock = threading.Lock()
        self.open = threading.Event()

    def job(self, name: str) -> Callable[[], str]:
        def run() -> str:
            with self.lock:
                self.started.append(name)
            assert self.open.wait(10), "the test never opened the gate"
            return name

        return run


def run_with(threads: int, scenario: Callable[[DecodePool], Coroutine[Any, Any, None]]) -> None:
    pool = DecodePool(threads)
    try:
        asyncio.run(scenario(pool))
    finally:
        pool.shutdown(wait=True)


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_a_request_waits_for_one_job_of_a_busy_request_not_all_of_them() -> None:
    # A plain executor runs jobs in arrival order: "small" would start after all of "big".
    gate = Gate()

    async def scenario(pool: DecodePool) -> None:
        big = [asyncio.ensure_future(pool.run("big", gate.job(f"big{i}"))) for i in range(5)]
        await until(lambda: gate.started == ["big0"])
        small = asyncio.ensure_future(pool.run("small", gate.job("small")))
        await asyncio.sleep(0.05)
        gate.open.set()
        assert await small == "small"
        assert await asyncio.gather(*big) == [f"big{i}" for i in range(5)]

    run_with(1, scenario)
    assert gate.started == ["big0", "big1", "small", "big2", "big3", "big4"]


def test_lines_take_turns_one_job_each() -> None:
    gate = Gate()

    async def scenario(pool: DecodePool) -> None:
        first = asyncio.ensure_future(pool.run("a", gate.job("a0")))
        await until(lambda: gate.started == ["a0"])
        names = ["a1", "a2", "a3", "b1", "b2", "c1"]  # in the order they arrive
        waiting = asyncio.gather(*(pool.run(name[0], gate.job(name)) for name in names))
        await asyncio.sleep(0.05)
        gate.open.set()
        await asyncio.gather(first, waiting)

    run_with(1, scenario)
    # In arrival order (a plain executor) b1 would wait for a3, and c1 for b2.
    assert gate.started == ["a0", "a1", "b1", "c1", "a2", "b2", "a3"]


def test_a_lone_request_leaves_one_thread_for_the_next() -> None:
    gate = Gate()

    async def scenario(pool: DecodePool) -> None:
        big = asyncio.gather(*(pool.run("big", gate.job(f"big{i}")) for i in range(6)))
        await until(lambda: len(gate.started) == 2)
        await asyncio.sleep(0.05)
        assert len(gate.started) == 2  # of three threads
        # A newcomer starts at once, while every job of the big request is still running.
        small = asyncio.ensure_future(pool.run("small", gate.job("small")))
        await until(lambda: "small" in gate.started)
        gate.open.set()
        await asyncio.gather(big, small)

    run_with(3, scenario)
    assert gate.started[:3] == ["big0", "big1", "small"]
    assert sorted(gate.started[3:]) == [f"big{i}" for i in range(2, 6)]


def test_jobs_of_a_cancelled_caller_never_start() -> None:
    gate = Gate()

    async def scenario(pool: DecodePool) -> None:
        runs = [asyncio.ensure_future(pool.run("gone", gate.job(f"gone{i}"))) for i in range(4)]
        await until(lambda: gate.started == ["gone0"])
        for run in runs:
            run.cancel()
        after = asyncio.ensure_future(pool.run("next", gate.job("next")))
        gate.open.set()
        assert await after == "next"
        assert pool.waiting == 0
        await asyncio.gather(*runs, return_exceptions=True)
        assert all(run.cancelled() for run in runs)

    run_with(1, scenario)
    assert gate.started == ["gone0", "next"]


def test_an_exception_reaches_its_caller_and_the_pool_goes_on() -> None:
    def fail() -> None:
        raise ValueError("broken image")

    async def scenario(pool: DecodePool) -> None:
        with pytest.raises(ValueError, match="broken image"):
            await pool.run("bad", fail)
        assert await pool.run("good", lambda: 42) == 42

    run_with(1, scenario)


def test_a_pool_shut_down_refuses_new_jobs() -> None:
    pool = DecodePool(1)
    pool.shutdown(wait=True)

    async def scenario() -> None:
        with pytest.raises(RuntimeError):
            await pool.run("late", lambda: 1)

    asyncio.run(scenario())
