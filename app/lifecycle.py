"""A server's life: requests in flight, the drain that ends it without losing one of them, and
the failure that ends it early (a model's batch loop died)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger("evalserve")


class Lifecycle:
    """Shared by the middleware (which counts requests) and whoever stops the server."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        # Why the server must stop and exit non-zero, once something fatal happened.
        self.failure: str | None = None
        self._on_failure: list[Callable[[str], None]] = []

    @contextmanager
    def accepting(self) -> Iterator[None]:
        """Around one request. Requests that arrive while draining are answered 503 at once;
        only those accepted before count towards what the drain waits for."""
        counted = not self.draining
        if counted:
            self.in_flight += 1
        try:
            yield
        finally:
            if counted:
                self.in_flight -= 1

    def on_failure(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(reason)`` when the server fails (the HTTP server stops on it)."""
        self._on_failure.append(listener)

    def fail(self, reason: str) -> None:
        """Something the server cannot recover from: turn not-ready, take no new work, and have
        the listeners stop the server (which then exits non-zero)."""
        if self.failure is not None:
            return
        self.failure = reason
        self.draining = True
        logger.critical("evalserve cannot go on serving: %s", reason)
        for listener in self._on_failure:
            listener(reason)

    async def drain(self, delay: float, timeout: float) -> bool:  # noqa: ASYNC109
        """Refuse new work (readiness 503, predict 503) and wait until every request already
        accepted has been answered, for at least ``delay`` and at most ``timeout`` seconds.
        Returns whether everything was answered in time."""
        self.draining = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        logger.info("draining: %d request(s) in flight", self.in_flight)
        while True:
            elapsed = loop.time() - started
            if self.in_flight == 0 and elapsed >= delay:
                logger.info("drained in %.2fs", elapsed)
                return True
            if elapsed >= max(timeout, delay):
                logger.warning("drain timed out with %d request(s) in flight", self.in_flight)
                return False
            await asyncio.sleep(0.02)
