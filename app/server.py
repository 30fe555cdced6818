"""Running the app under uvicorn, with evalserve's logging, limits and graceful drain.

On SIGTERM (or Ctrl-C) the server does not close its port at once, as plain uvicorn does:
it drains first. Readiness turns 503 and new predict requests get 503 with Retry-After (with
``Connection: close``), while every request already accepted is answered; only then does uvicorn
close the port and the lifespan stop the batchers, and the process exits 0. A second signal
stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn

from app import logs
from app.config import Settings
from app.lifecycle import Lifecycle
from app.main import create_app

logger = logging.getLogger("evalserve")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, settings: Settings) -> None:
        super().__init__(config)
        self._lifecycle = lifecycle
        self._settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises SIGTERM/SIGINT once it has shut down, so even a clean drain would
        # end with status 143. A replica told to stop that stopped cleanly exits 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._lifecycle.draining or self._loop is None or not self.started:
            super().handle_exit(sig, frame)  # a second signal, or still starting: stop now
            return
        logger.info("received %s: draining", signal.Signals(sig).name)
        self._lifecycle.draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        await self._lifecycle.drain(self._settings.drain_delay_s, self._settings.drain_timeout_s)
        self.should_exit = True


def run(settings: Settings) -> int:
    """Serve until stopped; 0 after a clean stop, 3 when start-up failed."""
    logs.configure(settings.log_level, settings.log_format)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        log_config=None,  # logs.configure owns the handlers and the format
        access_log=False,  # our middleware writes the access log, with request ids
        http="h11",
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=math.ceil(settings.keep_alive_s),
        # After the drain nothing is in flight; this only bounds stragglers.
        timeout_graceful_shutdown=math.ceil(settings.request_timeout_s),
    )
    server = DrainingServer(config, app.state.lifecycle, settings)
    server.run()
    # uvicorn returns (rather than raising) when the lifespan fails, e.g. a model that won't load.
    return 0 if server.started else 3
