"""Requests in flight and the drain that ends a server's life without losing one of them."""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger("evalserve")


class Lifecycle:
    """Shared by the middleware (which counts requests) and whoever stops the server."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0

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
