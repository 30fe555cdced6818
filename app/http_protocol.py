"""uvicorn's h11 protocol, with what it lacks against slow and hostile clients and for a clean
close. ``protocol_class(settings)`` gives the class to pass as ``uvicorn.Config(http=...)``.

* **Head timeout.** A new connection must deliver a complete request head within
  ``header_timeout_s``; on a kept-alive connection the clock starts at the next head's first
  byte (until then ``timeout_keep_alive`` applies). A silent connection is then closed; one
  that sent part of a head gets 408 first. uvicorn has no such timer: a head trickled in a
  byte at a time, or no byte at all, held a connection (and a file descriptor) for ever.
* **Connection cap.** A connection beyond ``max_connections`` open ones is answered 503 with
  ``Retry-After`` at once, without waiting for its request, and closed (as below). uvicorn's
  ``limit_concurrency`` answers only once a head arrives, so silent connections beyond the cap
  still pile up, and it logs every refusal. Here the cap and the head timeouts are logged at
  most once per ``REPORT_EVERY_S``, with counts.
* **Lingering close.** uvicorn closes a connection as soon as it has answered, even when the
  client is still sending (a 503 or 413 answered before the body was read). Closing a socket
  with unread bytes makes the kernel send a reset, and the client may lose the answer it was
  sent. Such a close here sends FIN after the answer, then reads and drops what the client
  still sends until it closes, for at most ``LINGER_IDLE_S`` without data and ``LINGER_MAX_S``
  in all (as Apache and nginx do).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from http import HTTPStatus
from typing import Any, ClassVar, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.api.errors import error_body
from app.config import Settings

logger = logging.getLogger("evalserve")

LINGER_IDLE_S = 2.0
LINGER_MAX_S = 10.0
REPORT_EVERY_S = 10.0


class RateLimitedWarning:
    """Counts events and logs a warning for them at most once per ``every_s`` seconds: the first
    at once, the rest at the end of their window, with the count as the message's last argument
    (the other arguments are the latest event's). An attack must not flood the log, nor go
    unseen."""

    def __init__(self, message: str, every_s: float = REPORT_EVERY_S) -> None:
        self.message = message
        self.every_s = every_s
        self.count = 0
        self.args: tuple[object, ...] = ()
        self.last = -math.inf
        self._flush: asyncio.TimerHandle | None = None

    def __call__(self, loop: asyncio.AbstractEventLoop, *args: object) -> None:
        self.count += 1
        self.args = args
        if self._flush is None:
            wait = self.last + self.every_s - loop.time()
            if wait <= 0:
                self.report(loop)
            else:
                self._flush = loop.call_later(wait, self.report, loop)

    def report(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flush = None
        if self.count:
            logger.warning(self.message, *self.args, self.count)
            self.count = 0
            self.last = loop.time()


def raw_response(status: int, code: str, message: str, headers: str = "") -> bytes:
    """A complete ``Connection: close`` response with evalserve's JSON error body, for a
    connection that has no request cycle to answer through (the app never sees it)."""
    body = json.dumps(error_body(code, message)).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n{headers}\r\n"
    )
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """One connection. The class attributes are set by ``protocol_class``."""

    header_timeout_s: ClassVar[float] = 10.0
    max_connections: ClassVar[int] = 1000
    over_cap: ClassVar[RateLimitedWarning]
    head_timeouts: ClassVar[RateLimitedWarning]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._socket: asyncio.Transport | None = None  # the real transport
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._linger_until = 0.0
        self.lingering = False
        self._lost = False

    @property
    def awaiting_head(self) -> bool:
        """A request head has been begun (or, on a new connection, not yet begun) and is not
        complete: what the drain waits for before the port closes."""
        return self._head_timer is not None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._socket = transport
        # uvicorn's protocol and its request cycles close the connection in five places; each
        # goes through _close this way.
        super().connection_made(cast(asyncio.Transport, _ClosingThroughProtocol(transport, self)))
        if len(self.connections) > self.max_connections:  # this one included
            self.over_cap(self.loop, len(self.connections))
            transport.write(
                raw_response(
                    503,
                    "unavailable",
                    "too many open connections; retry shortly",
                    "retry-after: 1\r\n",
                )
            )
            self._linger()
            return
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            # Answered already: read only so that the close is no reset; the bytes are dropped.
            self._rearm_linger()
            return
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()  # a pipelined head may have begun

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        for timer in (self._head_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._linger_timer = None
        super().connection_lost(exc)

    def shutdown(self) -> None:
        # A lingering connection has been answered and is closing; uvicorn's shutdown would
        # try to tell h11, whose state may be ERROR after a bad request (it would raise).
        if self.lingering:
            return
        assert self._socket is not None
        if self.awaiting_head and self.conn.trailing_data[0]:
            # A head still arriving as the port closes (the drain waited a while for it): an
            # answer, rather than a close the client would take for a lost request.
            self._socket.write(
                raw_response(
                    503, "unavailable", "the server is shutting down", "retry-after: 1\r\n"
                )
            )
            self._linger()
            return
        super().shutdown()

    def _watch_head(self) -> None:
        """Arm the head timer while a head is awaited, disarm it once the head is complete."""
        assert self._socket is not None
        awaited = (
            not self.lingering
            and not self._socket.is_closing()
            and self.conn.their_state is h11.IDLE
            # A new connection (no request yet) from its start; a kept-alive one from the
            # first byte of its next head, which h11 holds until the head is complete.
            and (self.cycle is None or bool(self.conn.trailing_data[0]))
        )
        if awaited and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)
        elif not awaited and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        assert self._socket is not None
        if self.lingering or self._socket.is_closing():
            return
        self.head_timeouts(self.loop)
        if self.conn.trailing_data[0]:
            # Part of a head came: tell the client why its request ends.
            self._socket.write(
                raw_response(
                    408,
                    "request_timeout",
                    f"the request head did not arrive within {self.header_timeout_s}s",
                )
            )
            self._linger()
        else:
            self._socket.close()  # nothing sent, nothing unread: a plain close resets nothing

    def _close(self) -> None:
        """Every close uvicorn makes: lingering while the client may still be sending."""
        assert self._socket is not None
        if self.lingering:
            return
        their_state = self.conn.their_state
        still_sending = their_state is h11.SEND_BODY or their_state is h11.ERROR
        if not self._lost and (still_sending or self.conn.trailing_data[0]):
            self._linger()
        else:
            self._socket.close()

    def _linger(self) -> None:
        assert self._socket is not None
        self.lingering = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._unset_keepalive_if_required()
        if not self._socket.can_write_eof():  # (TLS) no half-close: nothing better than a close
            self._socket.close()
            return
        self._socket.write_eof()  # FIN once the answer is out; the client reads it, then EOF
        self._socket.resume_reading()  # uvicorn pauses reading on a body nobody reads
        self._linger_until = self.loop.time() + LINGER_MAX_S
        self._rearm_linger()

    def _rearm_linger(self) -> None:
        assert self._socket is not None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        delay = min(LINGER_IDLE_S, max(self._linger_until - self.loop.time(), 0.0))
        self._linger_timer = self.loop.call_later(delay, self._socket.close)


class _ClosingThroughProtocol:
    """The transport as uvicorn's protocol sees it: ``close`` goes to the protocol's ``_close``
    and ``is_closing`` is true while it lingers; the rest is the real transport's."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        self._protocol._close()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def protocol_class(settings: Settings) -> type[GuardedH11Protocol]:
    """``GuardedH11Protocol`` with this server's limits (a class: uvicorn instantiates it)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout_s": settings.header_timeout_s,
            "max_connections": settings.max_connections,
            "over_cap": RateLimitedWarning(
                "connection cap reached: %d connections open, "
                f"EVALSERVE_MAX_CONNECTIONS={settings.max_connections}; "
                f"%d connection(s) answered 503 (logged at most every {REPORT_EVERY_S:.0f}s)"
            ),
            "head_timeouts": RateLimitedWarning(
                "closed %d connection(s) whose request head did not arrive within "
                f"{settings.header_timeout_s}s, EVALSERVE_HEADER_TIMEOUT_S "
                f"(logged at most every {REPORT_EVERY_S:.0f}s)"
            ),
        },
    )
