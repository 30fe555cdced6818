"""Running the app under uvicorn, with evalserve's logging, limits and graceful drain.

On SIGTERM (or Ctrl-C) the server does not close its port at once, as plain uvicorn does:
it drains first. Readiness turns 503 and new predict requests get 503 with Retry-After (with
``Connection: close``), while every request already accepted is answered. Then the kernel is told
to drop new connection attempts, every connection it had already accepted is answered, and only
then does uvicorn close the port (closing a port resets the connections still queued on it) and
the lifespan stop the batchers; the process exits 0. A second signal stops at once. A model whose
batch loop dies ends the server the same way, exiting 1. Connections are served by
``app.http_protocol`` (head timeout, connection cap, lingering close).

The port is bound before any model loads, so a second server on a taken port fails at once
(exit 2), not after minutes of loading; a model that cannot load ends start-up with one line
naming it and the cause (exit 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import signal
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import logs
from app.config import Settings
from app.http_protocol import protocol_class
from app.lifecycle import Lifecycle
from app.main import create_app

logger = logging.getLogger("evalserve")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Before the port closes: how long the accept queue must stay empty, with no connection waiting
# for its head, so that handshakes under way (one round trip) have completed and been answered;
# and the most the port waits for the heads of connections already accepted.
_PORT_SETTLE_S = 0.25
_PORT_CLOSE_GRACE_S = 2.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, settings: Settings) -> None:
        super().__init__(config)
        self._lifecycle = lifecycle
        self._settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._listeners: list[socket.socket] = []

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._listeners = list(sockets or [])
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

    def fail(self, _reason: str) -> None:
        """The lifecycle failed (a batch loop died): drain what can still be answered, then
        stop; ``run`` exits 1 so the process manager restarts the server."""
        if self._loop is None:
            self.should_exit = True
        elif self._drain_task is None:  # else a SIGTERM's drain is already under way
            self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        await self._lifecycle.drain(self._settings.drain_delay_s, self._settings.drain_timeout_s)
        await self._empty_the_port()
        self.should_exit = True

    async def _empty_the_port(self) -> None:
        """Make closing the port lose no connection. Closing a listening socket resets every
        connection still in its accept queue, and uvicorn's shutdown closes a connection whose
        request has not arrived yet: both clients had sent a request and got a reset (measured:
        15 of 16 clients that kept posting through a drain). So first new connection attempts
        are dropped (the client retries its SYN a second later, finds the port closed and is
        refused: nothing sent, nothing lost), and the port waits until the kernel holds no
        accepted connection and every connection has sent its head (and been answered 503)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        for sock in self._listeners:
            if not refuse_new_connections(sock):
                logger.warning(
                    "cannot drop new connections before closing the port: a connection "
                    "arriving as it closes may be reset"
                )
        grace = min(self._settings.header_timeout_s, _PORT_CLOSE_GRACE_S)
        quiet_since = started
        while loop.time() - started < grace + _PORT_SETTLE_S:
            if any(queued_connections(sock) for sock in self._listeners) or any(
                getattr(connection, "awaiting_head", False)
                for connection in self.server_state.connections
            ):
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= _PORT_SETTLE_S:
                break
            await asyncio.sleep(0.01)
        logger.info("closing the port %.2fs after the drain", loop.time() - started)


class QuietStartupFailure:
    """Around the app, for uvicorn only: when the lifespan fails, uvicorn logs the traceback
    Starlette hands it. Our lifespan has already logged one line naming the model and the cause
    (and the traceback at debug level), so the traceback is dropped here."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def quiet(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, quiet)


class PortInUse(OSError):
    """The address to serve on cannot be bound."""


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (not yet listening), or ``PortInUse`` saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on connections whose socket says
    # so, and without it every small response waits ~40 ms for the client's delayed ACK
    # (measured: /health/live took 44 ms instead of 1 ms with proto 0).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # As uvicorn does: rebinding right after a restart must not wait out TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


_SO_ATTACH_FILTER = 26  # Linux, <asm-generic/socket.h>
# A classic BPF socket filter, run by the kernel on each TCP segment to a listening socket (and
# inherited by its connections), with the TCP header at offset 0: drop a bare SYN (a new
# connection attempt), keep everything else (the handshakes under way complete).
_DROP_NEW_CONNECTIONS = (
    (0x30, 0, 0, 13),  # ldb [13]             A = the TCP flags byte
    (0x54, 0, 0, 0x12),  # and #0x12          A &= SYN | ACK
    (0x15, 0, 1, 0x02),  # jeq #0x02, 0, 1    SYN without ACK?
    (0x06, 0, 0, 0),  # ret #0                then drop it
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1      else keep the whole segment
)


def refuse_new_connections(sock: socket.socket) -> bool:
    """Have the kernel drop new connection attempts to listening ``sock`` while the connections
    it has already accepted can still be taken; whether that worked (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    program = b"".join(struct.pack("HBBI", *op) for op in _DROP_NEW_CONNECTIONS)
    buffer = ctypes.create_string_buffer(program, len(program))
    # struct sock_fprog {unsigned short len; struct sock_filter *filter;}; the kernel copies it.
    fprog = struct.pack("@HP", len(_DROP_NEW_CONNECTIONS), ctypes.addressof(buffer))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True


def queued_connections(sock: socket.socket) -> int:
    """Connections the kernel has accepted on listening ``sock`` that the server has not taken
    yet (its accept queue; 0 where TCP_INFO does not say)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError):
        return 0
    # struct tcp_info: 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked. For a
    # listening socket Linux reports its accept queue's length as tcpi_unacked.
    queued: int = struct.unpack_from("I", info, 24)[0]
    return queued


def run(settings: Settings) -> int:
    """Serve until stopped: 0 after a clean stop, 1 after a fatal failure while serving, 2 when
    the port cannot be bound (or the configuration is refused), 3 when a model cannot load.
    With ``workers`` above 1, ``app.workers`` runs the models here and the HTTP front-ends in
    processes of their own."""
    logs.configure(settings.log_level, settings.log_format)
    if settings.workers > 1:
        from app.workers import refusal

        problem = refusal(settings)
        if problem is not None:
            print(f"evalserve: cannot start: {problem}", file=sys.stderr)
            return 2
    try:
        sock = bind(settings.host, settings.port)
    except PortInUse as exc:
        print(f"evalserve: cannot start: {exc}", file=sys.stderr)
        return 2
    if settings.grpc_port:
        # gRPC binds its own socket in the lifespan; checking here fails a taken port with the
        # same exit code as HTTP's, before any model loads.
        try:
            bind(settings.host, settings.grpc_port).close()
        except PortInUse as exc:
            sock.close()
            print(f"evalserve: cannot start: {exc} (gRPC)", file=sys.stderr)
            return 2
    if settings.workers > 1:
        from app.workers import run_owner

        return run_owner(settings, sock)
    app = create_app(settings)
    host, port = sock.getsockname()[:2]
    logger.info("listening on http://%s:%d once the models are ready", host, port)
    return serve(app, settings, sock)


def serve(app: FastAPI, settings: Settings, sock: socket.socket) -> int:
    """Serve ``app`` on ``sock`` (bound; closed on return) until stopped, draining on SIGTERM:
    0 after a clean stop, 1 after a fatal failure while serving, 3 when the lifespan failed."""
    config = uvicorn.Config(
        QuietStartupFailure(app),
        lifespan="on",
        log_config=None,  # logs.configure owns the handlers and the format
        access_log=False,  # our middleware writes the access log, with request ids
        # uvicorn's h11 protocol with a head timeout, a connection cap and a lingering close
        # (app.http_protocol). httptools measured no better than h11, and h11 bounds a head
        # that arrives in pieces (h11_max_incomplete_event_size).
        http=protocol_class(settings),
        # uvloop where installed (a dependency on Linux): measured 1.7 to 3 ms less per request
        # than asyncio's loop (digits p50 3.2 against 4.8 ms, EfficientNet-Lite0 12.1 against
        # 15.2 ms, one client).
        loop="auto",
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=math.ceil(settings.keep_alive_s),
        # After the drain nothing is in flight; this only bounds stragglers.
        timeout_graceful_shutdown=math.ceil(settings.request_timeout_s),
    )
    lifecycle: Lifecycle = app.state.lifecycle
    server = DrainingServer(config, lifecycle, settings)
    lifecycle.on_failure(server.fail)
    try:
        server.run(sockets=[sock])
    except SystemExit as exc:  # uvicorn's way of saying the lifespan failed
        return exc.code if isinstance(exc.code, int) else 3
    finally:
        sock.close()
    if lifecycle.failure is not None:
        return 1
    return 0 if server.started else 3
