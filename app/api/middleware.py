"""One pure-ASGI middleware around every request: request id, access log, metrics, in-flight
count, and the last line of defence for unexpected exceptions (logged once, answered 500)."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_body
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
        started = time.perf_counter()
        request_id = (
            next(
                (
                    value.decode()
                    for name, value in scope["headers"]
                    if name == REQUEST_ID_HEADER and _SAFE_ID.match(value)
                ),
                None,
            )
            or uuid.uuid4().hex
        )
        info = request_info(scope)
        info["request_id"] = request_id
        status = 500
        response_started = False
        # Requests that arrive while draining are answered 503 at once; only those accepted
        # before count towards what the drain waits for.
        counted = not self.lifecycle.draining
        if counted:
            self.lifecycle.in_flight += 1

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = [*message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode())]
                if self.lifecycle.draining:
                    # Tell keep-alive clients not to reuse this connection: the port closes soon.
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            # uvicorn's h11 limit only bounds a head that arrives in pieces; a whole one that
            # fits in one read is checked here.
            head = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if head > self.max_header_bytes:
                status = 431
                await _send_json(
                    send_with_id,
                    431,
                    "header_too_large",
                    f"request headers are {head} bytes, the limit is {self.max_header_bytes}",
                )
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            error_logger.exception(
                "unhandled error on %s %s",
                scope["method"],
                scope["path"],
                extra={"request_id": request_id},
            )
            status = 500
            if not response_started:
                await _send_json(send_with_id, 500, "internal_error", "internal server error")
        finally:
            if counted:
                self.lifecycle.in_flight -= 1
            seconds = time.perf_counter() - started
            route = scope.get("route")
            # Unmatched paths share one label, so random URLs cannot explode the series count.
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.request_done(template, scope["method"], status, seconds)
            client = scope.get("client")
            access_logger.info(
                '%s "%s %s" %d %.1fms images=%s model=%s request_id=%s',
                client[0] if client else "-",
                scope["method"],
                scope["path"],
                status,
                seconds * 1000,
                info.get("images", "-"),
                info.get("model", "-"),
                request_id,
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "latency_ms": round(seconds * 1000, 2),
                    "images": info.get("images"),
                    "model": info.get("model"),
                    "client": client[0] if client else None,
                },
            )


async def _send_json(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps(error_body(code, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
