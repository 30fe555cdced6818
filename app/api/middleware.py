"""One pure-ASGI middleware around every request: request id, header-size check, in-flight
count, access log and metrics, and the last line of defence for unexpected exceptions (logged
once, answered 500). Each job is a small piece below; ``__call__`` only puts them in order."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_body_at
from app.lifecycle import Lifecycle
from app.metrics import Metrics

access_logger = logging.getLogger("evalserve.access")
error_logger = logging.getLogger("evalserve.api")

REQUEST_ID_HEADER = b"x-request-id"
# A client's id is kept only if it is short and plain, so it is safe in logs and headers.
_SAFE_ID = re.compile(rb"^[A-Za-z0-9._:/+=-]{1,128}$")


def request_info(scope: Scope) -> dict[str, Any]:
    """The per-request record the middleware logs; handlers add ``images`` and ``model``."""
    info: dict[str, Any] = scope.setdefault("evalserve", {})
    return info


def request_id_of(scope: Scope) -> str:
    """The client's ``X-Request-ID`` when it is safe to echo and log, else a fresh one."""
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER and _SAFE_ID.match(value):
            return str(value.decode())
    return uuid.uuid4().hex


def head_size(scope: Scope) -> int:
    """Bytes of the request's header lines, as they came on the wire (near enough)."""
    return sum(len(name) + len(value) + 4 for name, value in scope["headers"])


@dataclass(slots=True)
class Exchange:
    """One request/response as the middleware sees it: its id, and the response's status once
    it has started. ``send`` adds the request id (and, while draining, ``Connection: close``)."""

    request_id: str
    downstream: Send
    lifecycle: Lifecycle
    status: int = 500
    started: bool = False
    began: float = field(default_factory=time.perf_counter)

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = message["status"]
            headers = [*message.get("headers", []), (REQUEST_ID_HEADER, self.request_id.encode())]
            if self.lifecycle.draining:
                # Tell keep-alive clients not to reuse this connection: the port closes soon.
                headers.append((b"connection", b"close"))
            message = {**message, "headers": headers}
        await self.downstream(message)

    async def send_error(self, status: int, code: str, message: str, path: str = "") -> None:
        body = json.dumps(error_body_at(path, code, message)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})


def printable(text: str) -> str:
    """``text`` with ``\\``, ``"`` and every non-printable character (CR, LF, ESC, ...) escaped
    as Python writes them, so a percent-decoded path such as ``/v1/%0d%0aFAKE`` cannot forge a
    line, or a field, of a text log."""
    if text.isprintable() and "\\" not in text and '"' not in text:
        return text  # nearly every path
    return "".join(_escaped(c) for c in text)


def _escaped(c: str) -> str:
    if c == '"':
        return '\\"'
    if c == "\\" or not c.isprintable():
        return c.encode("unicode_escape").decode("ascii")
    return c


def log_access(scope: Scope, exchange: Exchange, seconds: float) -> None:
    info = request_info(scope)
    client = scope.get("client")
    host = client[0] if client else None
    access_logger.info(
        '%s "%s %s" %d %.1fms images=%s model=%s request_id=%s',
        host or "-",
        scope["method"],
        printable(scope["path"]),  # the message only: the path field stays exact
        exchange.status,
        seconds * 1000,
        info.get("images", "-"),
        info.get("model", "-"),
        exchange.request_id,
        extra={
            "request_id": exchange.request_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": exchange.status,
            "latency_ms": round(seconds * 1000, 2),
            "images": info.get("images"),
            "model": info.get("model"),
            "client": host,
        },
    )


class RequestMiddleware:
    def __init__(
        self, app: ASGIApp, metrics: Metrics, lifecycle: Lifecycle, max_header_bytes: int
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = Exchange(request_id_of(scope), send, self.lifecycle)
        request_info(scope)["request_id"] = exchange.request_id
        try:
            with self.lifecycle.accepting():
                await self._answer(scope, receive, exchange)
        finally:
            seconds = time.perf_counter() - exchange.began
            # Unmatched paths share one label, so random URLs cannot explode the series count.
            template = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.request_done(template, scope["method"], exchange.status, seconds)
            log_access(scope, exchange, seconds)

    async def _answer(self, scope: Scope, receive: Receive, exchange: Exchange) -> None:
        """The app's answer, or 431 for a head over the limit, or 500 for a crash."""
        try:
            # uvicorn's h11 limit only bounds a head that arrives in pieces; a whole one that
            # fits in one read is checked here.
            head = head_size(scope)
            if head > self.max_header_bytes:
                await exchange.send_error(
                    431,
                    "header_too_large",
                    f"request headers are {head} bytes, the limit is {self.max_header_bytes}",
                    scope["path"],
                )
                return
            await self.app(scope, receive, exchange.send)
        except Exception:
            error_logger.exception(
                "unhandled error on %s %s",
                scope["method"],
                printable(scope["path"]),
                extra={"request_id": exchange.request_id},
            )
            exchange.status = 500
            if not exchange.started:
                await exchange.send_error(
                    500, "internal_error", "internal server error", scope["path"]
                )
