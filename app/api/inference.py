"""One inference request, whatever its protocol (/v1, /v2): the ``Inference`` object that routes
receive as a dependency. It reads the body within its limits, decodes in the pool, goes through
the model's batcher, maps the batcher's refusals to HTTP errors, and counts rejected images."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from starlette.datastructures import Headers, State
from starlette.requests import ClientDisconnect, Request

from app.api.errors import (
    BadRequest,
    GatewayTimeout,
    InferenceFailed,
    InsufficientStorage,
    InvalidImage,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    ServiceUnavailable,
)
from app.api.middleware import request_info
from app.batching import (
    Arrival,
    BatcherClosed,
    BatcherDead,
    BatchFailed,
    BatchTooLarge,
    DeadlineExceeded,
    QueueFull,
    TooManyItems,
)
from app.config import Settings
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.preprocessing import (
    ImageError,
    ImageTooLarge,
    ImageTransform,
    load_image,
    plan_device_decode,
    probe,
)
from app.state import ServedModel, Serving
from app.values import EncodedImage, Item, TopK

T = TypeVar("T")
RETRY_AFTER = {"Retry-After": "1"}
# One image on its way to the model: encoded bytes to decode, or an array ready for the batch
# (uint8 (H, W, C) at the input size, or float32 (C, H, W) already normalised).
Upload = tuple[str, bytes | np.ndarray]

# Which rejections are counted in evalserve_images_rejected_total, and under what reason.
_REJECT_REASONS: dict[type[ServiceError], str] = {
    Overloaded: "queue_full",
    GatewayTimeout: "timeout",
    InvalidImage: "bad_image",
    PayloadTooLarge: "too_large",
    InsufficientStorage: "out_of_memory",
}


@dataclass(slots=True)
class Inference:
    """One inference request and everything it needs (the model, the server's state, the
    access-log record); routes get it from ``app.api.deps`` and build nothing themselves."""

    # None for a gRPC call (which reads no HTTP body, and whose cancellation gRPC delivers).
    request: Request | None
    model: ServedModel
    serving: Serving
    info: dict[str, Any]
    # When the request arrived (the event loop's clock): the request timeout counts from here.
    started: float
    # This request's line in the decode pool, which takes work from each line in turn.
    lane: object = field(default_factory=object, repr=False, compare=False)

    @classmethod
    @asynccontextmanager
    async def open(cls, request: Request, model: ServedModel) -> AsyncIterator[Inference]:
        """Around one HTTP inference request (see ``begin``)."""
        async with cls.begin(
            request.app.state, model, request_info(request.scope), request
        ) as call:
            yield call

    @classmethod
    @asynccontextmanager
    async def begin(
        cls, state: State, model: ServedModel, info: dict[str, Any], request: Request | None = None
    ) -> AsyncIterator[Inference]:
        """Around one inference request of any protocol (``state`` is the app's): refuse it
        while draining, note the model in ``info`` (the access-log record), and count the images
        of a rejected request by reason."""
        lifecycle: Lifecycle = state.lifecycle
        metrics: Metrics = state.metrics
        info["model"] = model.name
        if lifecycle.draining:
            raise ServiceUnavailable("the server is shutting down", headers=RETRY_AFTER)
        started = asyncio.get_running_loop().time()
        try:
            # Held until answered: a model unloaded or replaced meanwhile is stopped only after.
            with model.lease():
                yield cls(request, model, state.serving, info, started)
        except ServiceError as exc:
            reason = _REJECT_REASONS.get(type(exc))
            if reason is not None:
                metrics.reject(model.name, reason, info.get("images") or 1)
            raise

    @property
    def settings(self) -> Settings:
        return self.serving.settings

    @property
    def headers(self) -> Headers:
        """The HTTP request's headers (none for gRPC)."""
        return self.request.headers if self.request is not None else Headers()

    def expect(self, count: int) -> None:
        """Note that the request carries ``count`` images, refusing it at once when the model's
        queue could never hold them (413), or has no room for them now (503): call it before
        decoding anything, so a full queue costs no decoding. Images of requests still decoding
        (announced) count as queued: they hold their place."""
        self.info["images"] = count
        batcher = self.model.batcher
        try:
            batcher.check_fits(count)
        except TooManyItems:
            raise PayloadTooLarge(
                f"{count} images, more than the queue can ever hold ({batcher.max_queue_size})"
            ) from None
        if batcher.depth + batcher.announced + count > batcher.max_queue_size:
            raise Overloaded(
                f"model {self.model.name!r} is at capacity; retry shortly", headers=RETRY_AFTER
            )

    async def offload(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in the decode pool, taking turns with other requests' work: for
        parsing or encoding heavy enough to stall every other request on the event loop."""
        return await self.serving.decode_pool.run(self.lane, function, *args)

    async def read_body(self, reader: Callable[[AsyncGenerator[bytes, None]], Awaitable[T]]) -> T:
        """Run ``reader`` over the request's body stream, bounded in size and arrival time."""
        assert self.request is not None, "only HTTP requests have a body to read"
        settings = self.settings
        limit = settings.max_upload_bytes
        declared = self.request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the request body is {declared} bytes, the limit is {limit}")
        try:
            async with asyncio.timeout(settings.body_timeout_s):
                return await reader(limited(self.request.stream(), limit))
        except ClientDisconnect:
            raise BadRequest("the client disconnected while sending the body") from None
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {settings.body_timeout_s}s"
            ) from None

    async def classify(
        self, uploads: Sequence[Upload], k: int, deadline_s: float | None = None
    ) -> list[TopK]:
        """Top-``k`` of every upload, through the model's batcher, within the request timeout
        (and within ``deadline_s`` from now, the client's own deadline, when given)."""
        self.expect(len(uploads))
        model, settings = self.model, self.settings
        loop = asyncio.get_running_loop()
        # The batch now gathering may wait for these images while they decode.
        arrival = model.batcher.announce(len(uploads))
        try:
            deadline = loop.time() + (float("inf") if deadline_s is None else max(deadline_s, 0))
            # Decoding too stops when the client leaves: its images not yet begun are dropped.
            work = self._decode_and_submit(uploads, k, deadline, arrival)
            if self.request is None:
                return await work
            return await _unless_disconnected(self.request, work)
        except QueueFull:
            raise Overloaded(
                f"model {model.name!r} is at capacity; retry shortly", headers=RETRY_AFTER
            ) from None
        except BatcherClosed:
            raise ServiceUnavailable("the server is shutting down", headers=RETRY_AFTER) from None
        except BatcherDead:
            raise ServiceUnavailable(
                f"model {model.name!r} stopped serving; the server is restarting",
                headers=RETRY_AFTER,
            ) from None
        except DeadlineExceeded:
            raise GatewayTimeout(
                f"no prediction within the request timeout ({settings.request_timeout_s}s)"
            ) from None
        except BatchFailed:
            # Logged with its traceback by the batcher; the client gets no internals.
            raise InferenceFailed("the model failed on the batch holding this request") from None
        except BatchTooLarge:
            # Logged by the batcher, which already tried the batch in halves; a later batch,
            # or this request with fewer images, may fit.
            raise InsufficientStorage(
                "the model ran out of device memory on the batch holding this request; "
                "retry, with fewer images"
            ) from None
        # While decoding here, or (an image its device decodes) in its batch. The first bad
        # image fails the request, naming itself; the others stop.
        except ImageTooLarge as exc:
            raise PayloadTooLarge(str(exc)) from None
        except ImageError as exc:
            raise InvalidImage(str(exc)) from None
        finally:
            arrival.cancel()

    async def _decode_and_submit(
        self, uploads: Sequence[Upload], k: int, deadline: float, arrival: Arrival
    ) -> list[TopK]:
        arrays = await self._decode(uploads)
        loop = asyncio.get_running_loop()
        remaining = self.settings.request_timeout_s - (loop.time() - self.started)
        remaining = max(min(remaining, deadline - loop.time()), 0.0)
        items = [Item(array, k) for array in arrays]
        return await self.model.batcher.submit(items, remaining, arrival)

    async def _decode(self, uploads: Sequence[Upload]) -> list[np.ndarray | EncodedImage]:
        """Decode and transform the encoded uploads in the decode pool; arrays pass through,
        and so do the JPEGs that the model's device decodes (as ``EncodedImage``).

        Every header is read first, so an image over the pixel limit, or images over the
        request's pixel budget together, are refused before any pixel is decoded. The first bad
        one fails them all, naming itself (``ImageError``), and the others stop."""
        settings = self.settings
        max_pixels, transform = settings.max_image_pixels, self.model.transform
        encoded = [(name, data) for name, data in uploads if not isinstance(data, np.ndarray)]
        on_device: list[EncodedImage | None] = [None] * len(encoded)
        if encoded:
            plan = self.model.facts.preprocessing.device_decode
            pixels, on_device = await self.offload(
                _read_headers, encoded, max_pixels, transform if plan else None
            )
            if pixels > settings.max_request_pixels:
                raise PayloadTooLarge(
                    f"the images hold {pixels} pixels together ({len(encoded)} of them), "
                    f"the limit per request is {settings.max_request_pixels}"
                )
        planned = iter(on_device)
        return await _all_or_none(
            [
                _ready(data)
                if isinstance(data, np.ndarray)
                else _ready(device)
                if (device := next(planned)) is not None
                else self.offload(load_image, data, name, max_pixels, transform)
                for name, data in uploads
            ]
        )


def _read_headers(
    uploads: Sequence[tuple[str, bytes]], max_pixels: int, device: ImageTransform | None
) -> tuple[int, list[EncodedImage | None]]:
    """The pixels of every upload together, each header checked (one job: headers are cheap);
    and, for a model that decodes JPEGs on its device (its ``device`` transform given), each
    upload as the ``EncodedImage`` it gets, or None where the CPU must decode it."""
    if device is None:
        return sum(probe(data, name, max_pixels) for name, data in uploads), [None] * len(uploads)
    plans = [plan_device_decode(data, name, max_pixels, device) for name, data in uploads]
    return sum(pixels for pixels, _ in plans), [encoded for _, encoded in plans]


async def _ready(image: T) -> T:
    return image


async def _all_or_none(work: Sequence[Awaitable[T]]) -> list[T]:
    """Every result in order; on the first failure, the rest are cancelled (jobs not yet begun
    never run) and that failure is raised."""
    tasks = [asyncio.ensure_future(item) for item in work]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        # Settles every task (and retrieves its exception) before the caller answers.
        await asyncio.gather(*tasks, return_exceptions=True)


async def limited(stream: AsyncIterator[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    """Pass chunks through, failing as soon as the running total passes ``limit``."""
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        yield chunk


async def read_all(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in stream])


async def _until_disconnected(request: Request) -> None:
    # With the body read, the next ASGI message is the disconnect (or the end of the response).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client goes away first, cancel it (dropping its queued images)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        # Let the cancellation run, so the batcher sees the dropped futures before we answer.
        await asyncio.gather(task, return_exceptions=True)
        raise BadRequest("the client disconnected")
    return task.result()
