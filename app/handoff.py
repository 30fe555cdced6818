"""The hand-off between HTTP front-end processes and the one process that runs the models
(``EVALSERVE_WORKERS`` above 1; ``app.workers`` starts the processes).

Each front-end owns a slab of shared memory (an anonymous ``memfd`` the model process created
for it and both map) and a ``SlabAllocator`` over it. Per request, the front-end writes its
images' bytes into one region of the slab and sends a small message over a Unix socket: the
model, the region, and per image its offset, shape, dtype (or, for an ``EncodedImage``, its
length and header facts) and top-k, with the time left. The model process builds numpy views on
the slab (no copy; an ``EncodedImage``'s bytes are copied out), submits them to the model's real
``Batcher``, and answers with the top-k lists or the name of the batcher's exception, which the
front-end raises again, so every HTTP answer is the one a single process gives.

A region is freed when its answers arrive (every image computed: no forward pass reads it any
more), or else, after an error or a cancellation, when the model process says that nothing
references it any more: a finalizer on the region's base array, run when the last view of it
dies, sends ``released``. So a client that leaves cancels its images without their region
being reused while a forward pass may still read it, and no region leaks. (The batcher keeps its
latest batch referenced until the next one forms, so such a region may wait for the model's
next batch.) A full slab answers ``QueueFull`` (503 with Retry-After).

Torch-free (an import-linter contract): a front-end imports this module and never torch.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gc
import itertools
import logging
import mmap
import os
import pickle
import struct
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Response
from prometheus_client import CollectorRegistry, Gauge, Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.batching import (
    Arrival,
    Batcher,
    BatcherClosed,
    BatcherDead,
    BatcherError,
    BatchFailed,
    BatchTooLarge,
    DeadlineExceeded,
    QueueFull,
    TooManyItems,
    WorkerLost,
)
from app.config import Settings
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.preprocessing import BadImage, DecodePool, ImageError, ImageTooLarge, ImageTransform
from app.state import ServedModel, Serving
from app.values import EncodedImage, Item, ModelFacts, TopK

logger = logging.getLogger("evalserve")

# Every region starts on a cache line (and so is aligned for any dtype's view).
ALIGN = 64
# How often the model process tells each front-end its models' queue depth and health.
STATUS_INTERVAL_S = 0.05
# A front-end waits this much longer than the request's timeout for the model process's answer
# (which enforces the timeout itself) before it gives up on its own.
_REPLY_GRACE_S = 2.0
# How long a region released by neither its answer nor its finalizer waits for a collection.
_COLLECT_AFTER_S = 1.0
# The longest a front-end's /metrics waits for the model process's figures.
_METRICS_WAIT_S = 5.0
_HEADER = struct.Struct("!I")
# The batcher's exceptions, by name, as they cross the socket.
ERRORS: dict[str, type[BatcherError]] = {
    cls.__name__: cls
    for cls in (
        QueueFull,
        TooManyItems,
        DeadlineExceeded,
        BatcherClosed,
        BatchFailed,
        BatcherDead,
        BatchTooLarge,
        WorkerLost,
    )
}
# An image the model's device could not decode comes back as one of these (a 400 or a 413).
IMAGE_ERRORS: dict[str, type[ImageError]] = {
    cls.__name__: cls for cls in (ImageError, BadImage, ImageTooLarge)
}


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


class SlabAllocator:
    """First-fit allocation of regions of a slab of ``size`` bytes (offsets only: it never
    touches the memory). Freed regions merge with their free neighbours."""

    def __init__(self, size: int) -> None:
        self.size = size
        # Free extents, sorted by offset: (offset, length).
        self._free: list[tuple[int, int]] = [(0, size)] if size > 0 else []
        self._used: dict[int, int] = {}

    @property
    def used(self) -> int:
        """Bytes held by regions not yet freed."""
        return sum(self._used.values())

    @property
    def regions(self) -> int:
        return len(self._used)

    def allocate(self, size: int) -> int | None:
        """The offset of a free region of ``size`` bytes (rounded up to ``ALIGN``), or None
        when no free extent is that large."""
        size = _aligned(max(size, 1))
        for index, (offset, length) in enumerate(self._free):
            if length >= size:
                if length == size:
                    del self._free[index]
                else:
                    self._free[index] = (offset + size, length - size)
                self._used[offset] = size
                return offset
        return None

    def free(self, offset: int) -> None:
        """Give back the region at ``offset`` (``KeyError`` if none is allocated there)."""
        size = self._used.pop(offset)
        index = bisect.bisect(self._free, (offset, 0))
        start, end = offset, offset + size
        if index < len(self._free) and self._free[index][0] == end:  # merge with the next
            end += self._free[index][1]
            del self._free[index]
        if index > 0 and sum(self._free[index - 1]) == start:  # and with the previous
            start = self._free[index - 1][0]
            del self._free[index - 1]
            index -= 1
        self._free.insert(index, (start, end - start))

    def reset(self) -> None:
        """Free every region (the other side is gone: nothing reads the slab any more)."""
        self._used.clear()
        self._free = [(0, self.size)] if self.size > 0 else []


def create_slab(size: int) -> tuple[int, mmap.mmap]:
    """An anonymous shared-memory file of ``size`` bytes (its pages are allocated when first
    written) and this process's mapping of it. Pass the descriptor to the other process, which
    maps it with ``map_slab``; the memory is freed when both have closed it, even after a
    crash (unlike a named segment in /dev/shm)."""
    fd = os.memfd_create("evalserve-slab", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise


def map_slab(fd: int, size: int) -> mmap.mmap:
    return mmap.mmap(fd, size)


def slab_size(settings: Settings, models: Sequence[ModelFacts]) -> int:
    """The bytes of one front-end's slab: room for a full queue and a batch of the largest
    model's images as float32 (four times their uint8 size), at least 8 MiB and at most 1 GiB.
    Pages are only allocated when written, so what is resident is what the busiest moment
    used."""
    largest = max((int(np.prod(facts.input_size)) for facts in models), default=0)
    size = (settings.max_queue_size + settings.max_batch_size) * largest * 4
    size = min(max(size, 8 << 20), 1 << 30)
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


# --- framing ---------------------------------------------------------------------------------


def frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> Any:
    """The next message, or ``EOFError`` when the other side closed. Both sides are this
    server's own processes (the model process starts its front-ends), so pickle is safe."""
    try:
        header = await reader.readexactly(_HEADER.size)
        (length,) = _HEADER.unpack(header)
        return pickle.loads(await reader.readexactly(length))
    except asyncio.IncompleteReadError:
        raise EOFError("the hand-off connection closed") from None


# --- the model process's side ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelOffer:
    """What a front-end needs to serve a model it does not run."""

    facts: ModelFacts
    transform: ImageTransform
    max_batch_size: int
    max_delay_s: float
    max_queue_size: int


class HandoffServer:
    """In the model process: serves the front-ends' hand-off connections on a Unix socket.
    ``slabs`` maps a front-end's index to its slab (it says its index when it connects)."""

    def __init__(
        self, serving: Serving, slabs: dict[int, mmap.mmap], metrics: Callable[[], bytes]
    ) -> None:
        self._serving = serving
        self._slabs = slabs
        self._metrics = metrics
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.failure: str | None = None

    async def start(self, path: str) -> None:
        self._server = await asyncio.start_unix_server(self._connection, path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        connection: _Connection | None = None
        try:
            hello = await read_message(reader)
            index = hello[1]
            connection = _Connection(self._serving, self._slabs[index], writer, self._metrics)
            connection.welcome()
            await connection.serve(reader)
        except (EOFError, ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # a bug: the front-end loses its connection and stops (exit 1)
            logger.exception("hand-off: a front-end's connection failed")
        finally:
            if connection is not None:
                await connection.close()
            writer.close()
            self._connections.discard(task)


class _Connection:
    """One front-end, as the model process sees it."""

    def __init__(
        self,
        serving: Serving,
        slab: mmap.mmap,
        writer: asyncio.StreamWriter,
        metrics: Callable[[], bytes],
    ) -> None:
        self._serving = serving
        self._slab = slab
        self._writer = writer
        self._metrics = metrics
        self._loop = asyncio.get_running_loop()
        self._arrivals: dict[int, Arrival] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._released: list[int] = []
        # Requests answered with an error whose region is still referenced (see ``_answer``).
        self._unreleased: set[int] = set()
        self._collecting: asyncio.TimerHandle | None = None
        self._status: asyncio.Task[None] | None = None
        self._closed = False

    def send(self, message: object) -> None:
        if not self._closed and not self._writer.is_closing():
            self._writer.write(frame(message))

    def welcome(self) -> None:
        offers = {
            name: ModelOffer(
                model.facts,
                model.transform,
                model.batcher.max_batch_size,
                model.batcher.max_delay_s,
                model.batcher.max_queue_size,
            )
            for name, model in self._serving.models.items()
        }
        self.send(("welcome", offers, self._serving.ready))
        self._send_status()
        self._status = self._loop.create_task(self._report())

    def _send_status(self) -> None:
        self.send(
            (
                "status",
                {
                    name: (
                        model.batcher.depth,
                        model.batcher.announced,
                        model.batcher.in_flight,
                        model.batcher.stalled,
                        None if model.batcher.death is None else repr(model.batcher.death),
                    )
                    for name, model in self._serving.models.items()
                },
            )
        )

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            self._send_status()

    async def serve(self, reader: asyncio.StreamReader) -> None:
        while True:
            message = await read_message(reader)
            kind = message[0]
            if kind == "submit":
                self._submit(*message[1:])
            elif kind == "announce":
                _, aid, name, count = message
                model = self._serving.models.get(name)
                if model is not None:
                    self._arrivals[aid] = model.batcher.announce(count)
            elif kind == "unannounce":
                arrival = self._arrivals.pop(message[1], None)
                if arrival is not None:
                    arrival.cancel()
            elif kind == "cancel":
                task = self._tasks.get(message[1])
                if task is not None:
                    task.cancel()
            elif kind == "metrics":
                self.send(("metrics", self._metrics()))

    def _submit(
        self,
        rid: int,
        name: str,
        aid: int | None,
        timeout: float,
        offset: int,
        length: int,
        specs: list[tuple[Any, ...]],
    ) -> None:
        arrival = self._arrivals.pop(aid, None) if aid is not None else None
        # One base array over the request's region; every image is a view of it, so the
        # finalizer runs when the last of them dies: then the region may be reused.
        base = np.frombuffer(self._slab, np.uint8, count=length, offset=offset)
        finalizer = weakref.finalize(base, _call_soon, self._loop, self._release, rid)
        finalizer.atexit = False
        items: list[Item] = []
        for spec in specs:
            if spec[0] == "array":
                _, start, shape, dtype, top_k = spec
                dtype = np.dtype(dtype)
                size = int(np.prod(shape)) * dtype.itemsize
                items.append(Item(base[start : start + size].view(dtype).reshape(shape), top_k))
            else:
                _, start, size, image_name, orientation, image_size, top_k = spec
                data = bytes(base[start : start + size])
                items.append(Item(EncodedImage(image_name, data, orientation, image_size), top_k))
        del base
        task = self._loop.create_task(self._answer(rid, name, items, timeout, arrival))
        self._tasks[rid] = task

    async def _answer(
        self,
        rid: int,
        name: str,
        items: list[Item],
        timeout: float,  # noqa: ASYNC109 (the batcher's deadline, passed on)
        arrival: Arrival | None,
    ) -> None:
        reply: tuple[Any, ...]
        # Whether no forward pass can read the request's images any more once this answer is
        # sent: all computed, or refused before any was queued. Otherwise (a timeout, a
        # cancellation, a failed batch while another of the request's images computes) the
        # region is freed by the finalizer.
        done_reading = False
        try:
            model = self._serving.models.get(name)
            if model is None:
                raise BatcherClosed(f"model {name!r} is not served")
            pending = model.batcher.submit(items, timeout, arrival)
            del items  # the batcher holds them while it needs them, and no longer
            results = await pending
            reply = ("ok", rid, [(result.scores, result.indices) for result in results])
            done_reading = True
        except (QueueFull, TooManyItems, BatcherClosed) as exc:  # raised before queueing any
            reply = ("error", rid, type(exc).__name__, str(exc))
            done_reading = True
        except asyncio.CancelledError:
            reply = ("error", rid, "DeadlineExceeded", "the request was cancelled")
        except BatcherError as exc:
            reply = ("error", rid, type(exc).__name__, str(exc))
        except ImageError as exc:
            kind = type(exc).__name__ if type(exc).__name__ in IMAGE_ERRORS else "ImageError"
            reply = ("image_error", rid, kind, exc.name, exc.message)
        except Exception as exc:
            logger.exception("hand-off: request %d for model %s failed", rid, name)
            reply = ("error", rid, "BatchFailed", f"hand-off failed: {exc!r}")
        finally:
            if arrival is not None:
                arrival.cancel()
            self._tasks.pop(rid, None)
        self.send(reply)
        if not done_reading:
            self._awaiting_release(rid)

    def _awaiting_release(self, rid: int) -> None:
        """An error's traceback often holds the frames that held the images (a reference
        cycle), so their region would wait for the garbage collector's next full pass: after
        a second, one collection frees whatever is still held."""
        self._unreleased.add(rid)
        if self._collecting is None:
            self._collecting = self._loop.call_later(_COLLECT_AFTER_S, self._collect)

    def _collect(self) -> None:
        self._collecting = None
        if self._unreleased:
            gc.collect()

    def _release(self, rid: int) -> None:
        self._unreleased.discard(rid)
        # Released regions travel together: one message per event-loop turn, not per request.
        if not self._released:
            self._loop.call_soon(self._flush_released)
        self._released.append(rid)

    def _flush_released(self) -> None:
        released, self._released = self._released, []
        self.send(("released", released))

    async def close(self) -> None:
        """The front-end is gone: drop its announcements and its queued images."""
        self._closed = True
        if self._collecting is not None:
            self._collecting.cancel()
        if self._status is not None:
            self._status.cancel()
        for arrival in self._arrivals.values():
            arrival.cancel()
        self._arrivals.clear()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[int], None], rid: int) -> None:
    """From a finalizer, in whatever thread dropped the last view (the model's worker thread,
    often)."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
        loop.call_soon_threadsafe(callback, rid)


# --- the front-end's side --------------------------------------------------------------------


class RemoteArrival(Arrival):
    """Images announced to the model process's batcher (their request is decoding them)."""

    __slots__ = ("_client", "_id", "_open")

    def __init__(self, client: HandoffClient, model: str, count: int) -> None:
        # Not Arrival.__init__: there is no local batcher to count them.
        self._batcher = None
        self._count = count
        self._client = client
        self._id = client.next_id()
        self._open = client.send(("announce", self._id, model, count))

    def take(self) -> int | None:
        """The announcement's id, settled by the submit that carries it (None if none is
        open any more)."""
        if not self._open:
            return None
        self._open = False
        return self._id

    def cancel(self) -> None:
        if self._open:
            self._open = False
            self._client.send(("unannounce", self._id))


class RemoteBatcher(Batcher[Item, TopK]):
    """A model's batcher as a front-end sees it: ``submit`` writes the images into the slab and
    hands them to the model process's batcher; queue depth, announced images, stalls and the
    loop's death are the model process's, as of its latest status (at most
    ``STATUS_INTERVAL_S`` old)."""

    def __init__(self, client: HandoffClient, name: str, offer: ModelOffer) -> None:
        super().__init__(
            _never_computed,
            _NoExecutor(),
            max_batch_size=offer.max_batch_size,
            max_delay_s=offer.max_delay_s,
            max_queue_size=offer.max_queue_size,
            name=name,
        )
        self._client = client
        self._remote_depth = 0
        self._remote_announced = 0
        self._remote_in_flight = 0
        self._remote_stalled = False

    def update(
        self, depth: int, announced: int, in_flight: int, stalled: bool, death: str | None
    ) -> None:
        self._remote_depth = depth
        self._remote_announced = announced
        self._remote_in_flight = in_flight
        self._remote_stalled = stalled
        if death is not None and self.death is None:
            self.death = BatcherDead(f"{self.name} stopped computing: {death}")

    @property
    def depth(self) -> int:
        return self._remote_depth

    @property
    def in_flight(self) -> int:
        return self._remote_in_flight

    @property
    def announced(self) -> int:
        return self._remote_announced

    @property
    def stalled(self) -> bool:
        return self._remote_stalled

    @property
    def alive(self) -> bool:
        return self.death is None

    def announce(self, count: int) -> Arrival:
        return RemoteArrival(self._client, self.name, count)

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        self._closing = True

    async def submit(
        self,
        payloads: Sequence[Item],
        timeout: float,  # noqa: ASYNC109 (a deadline for the results, not a cancel scope)
        arrival: Arrival | None = None,
    ) -> list[TopK]:
        remote = arrival if isinstance(arrival, RemoteArrival) else None
        try:
            self.check_fits(len(payloads))
            if self.death is not None:
                raise self.death
            if self._closing:
                raise BatcherClosed(f"{self.name} is not accepting work")
            return await self._client.submit(self.name, payloads, timeout, remote)
        finally:
            if remote is not None:
                remote.cancel()  # when the submit did not carry it (refused before)


def _never_computed(items: list[Item]) -> list[TopK]:
    del items
    raise AssertionError("a front-end's batcher computes nothing")


class _NoExecutor(Executor):
    """A front-end runs no model."""


class RemoteRunner:
    """The ``Runner`` of a model that runs in another process: only its facts are here."""

    def __init__(self, facts: ModelFacts) -> None:
        self._facts = facts
        self.executor: Executor = _NoExecutor()

    # Typed Any: whatever the runtime's answers are, this one never gives any.
    def predict(self, items: list[Item]) -> Any:
        del items
        raise RuntimeError("this model runs in the model process")

    def submit(self, items: list[Item]) -> Any:
        del items
        raise RuntimeError("this model runs in the model process")

    def describe(self) -> ModelFacts:
        return self._facts

    def close(self) -> None:
        pass


class HandoffClient:
    """A front-end's connection to the model process, with its slab."""

    def __init__(self, slab: mmap.mmap, on_lost: Callable[[str], None] | None = None) -> None:
        self._slab = slab
        self._view = memoryview(slab)
        self.allocator = SlabAllocator(len(slab))
        self._on_lost = on_lost
        self._ids = itertools.count(1)
        # Requests whose answer has not arrived, and regions the model process still holds.
        self._replies: dict[int, asyncio.Future[tuple[Any, ...]]] = {}
        self._regions: dict[int, int] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self.batchers: dict[str, RemoteBatcher] = {}
        self.offers: dict[str, ModelOffer] = {}
        self.owner_ready = False
        self.owner_metrics = b""
        self._metrics_waiters: deque[asyncio.Future[bytes]] = deque()
        self.lost: str | None = None

    def next_id(self) -> int:
        return next(self._ids)

    async def connect(self, path: str, index: int) -> None:
        """Connect, say which front-end this is, and read the models on offer."""
        self._reader, self._writer = await asyncio.open_unix_connection(path)
        self._writer.write(frame(("hello", index, os.getpid())))
        kind, offers, ready = await read_message(self._reader)
        assert kind == "welcome", kind
        self.offers, self.owner_ready = offers, ready
        self.batchers = {name: RemoteBatcher(self, name, offer) for name, offer in offers.items()}
        self._task = asyncio.get_running_loop().create_task(self._receive(self._reader))

    def send(self, message: object) -> bool:
        """Write ``message``; whether it could be (not once the connection is lost)."""
        if self._writer is None or self._writer.is_closing() or self.lost is not None:
            return False
        self._writer.write(frame(message))
        return True

    async def fetch_metrics(self) -> bytes:
        """The model process's metrics now (the latest ones it sent, if it does not answer
        within a few seconds)."""
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._metrics_waiters.append(waiter)
        if not self.send(("metrics",)):
            return self.owner_metrics
        try:
            async with asyncio.timeout(_METRICS_WAIT_S):
                return await waiter
        except TimeoutError:
            return self.owner_metrics

    async def submit(
        self,
        model: str,
        items: Sequence[Item],
        timeout: float,  # noqa: ASYNC109 (the batcher's deadline, passed on)
        arrival: RemoteArrival | None,
    ) -> list[TopK]:
        if self.lost is not None:
            raise BatcherDead(f"the model process is gone ({self.lost})")
        specs: list[tuple[Any, ...]] = []
        chunks: list[tuple[int, memoryview | bytes]] = []
        length = 0
        for item in items:
            payload = item.array
            if isinstance(payload, EncodedImage):
                specs.append(
                    (
                        "encoded",
                        length,
                        len(payload.data),
                        payload.name,
                        payload.orientation,
                        payload.size,
                        item.top_k,
                    )
                )
                chunks.append((length, payload.data))
                length += _aligned(len(payload.data))
            else:
                array = np.ascontiguousarray(payload)
                specs.append(("array", length, array.shape, array.dtype.str, item.top_k))
                chunks.append((length, array.reshape(-1).view(np.uint8).data))
                length += _aligned(array.nbytes)
        offset = self.allocator.allocate(length)
        if offset is None:
            raise QueueFull(
                f"{model}: this front-end's hand-off memory is full "
                f"({self.allocator.used} of {self.allocator.size} bytes in use)"
            )
        for start, data in chunks:
            self._view[offset + start : offset + start + len(data)] = data
        rid = self.next_id()
        reply: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()
        self._replies[rid] = reply
        self._regions[rid] = offset
        # The submit settles the announcement, in the model process's batcher.
        aid = arrival.take() if arrival is not None else None
        self.send(("submit", rid, model, aid, timeout, offset, length, specs))
        try:
            async with asyncio.timeout(timeout + _REPLY_GRACE_S):
                answer = await reply
        except TimeoutError:
            self._abandon(rid)
            raise DeadlineExceeded(
                f"no answer from the model process within {timeout:.3f}s"
            ) from None
        except asyncio.CancelledError:
            self._abandon(rid)
            raise
        if answer[0] == "ok":
            return [TopK(scores, indices) for scores, indices in answer[2]]
        if answer[0] == "image_error":
            _, _, kind, image, message = answer
            raise IMAGE_ERRORS[kind](image, message)
        _, _, name, text = answer
        raise ERRORS.get(name, BatchFailed)(text)

    def _free(self, rid: int) -> None:
        offset = self._regions.pop(rid, None)
        if offset is not None:
            self.allocator.free(offset)

    def _abandon(self, rid: int) -> None:
        """The request gave up (its client left, or no answer came in time): the model process
        drops its images; the region is freed when it says it no longer holds them."""
        if self._replies.pop(rid, None) is not None:
            self.send(("cancel", rid))

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await read_message(reader)
                kind = message[0]
                if kind in ("ok", "error", "image_error"):
                    if kind == "ok":
                        # Every image has its answer: no forward pass reads them any more.
                        self._free(message[1])
                    reply = self._replies.pop(message[1], None)
                    if reply is not None and not reply.done():
                        reply.set_result(message)
                elif kind == "released":
                    for rid in message[1]:
                        self._free(rid)
                elif kind == "status":
                    for name, state in message[1].items():
                        batcher = self.batchers.get(name)
                        if batcher is not None:
                            batcher.update(*state)
                elif kind == "metrics":
                    self.owner_metrics = message[1]
                    # Answers come in the order asked.
                    while self._metrics_waiters:
                        waiter = self._metrics_waiters.popleft()
                        if not waiter.done():
                            waiter.set_result(message[1])
                            break
        except (EOFError, ConnectionError) as exc:
            self._lose(str(exc) or type(exc).__name__)

    def _lose(self, reason: str) -> None:
        self.lost = reason
        error = BatcherDead(f"the model process is gone ({reason})")
        for batcher in self.batchers.values():
            batcher.death = error
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(error)
        self._replies.clear()
        # Nothing reads the slab any more.
        self._regions.clear()
        self.allocator.reset()
        if self._on_lost is not None:
            self._on_lost(reason)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()


def open_remote_models(
    path: str, index: int, slab: mmap.mmap
) -> Callable[[Settings, Metrics, Lifecycle], AbstractAsyncContextManager[Serving]]:
    """For ``app.main.create_app(open_models=...)``: the models of the model process listening
    on ``path``, fed through ``slab``. The front-end fails (and exits non-zero) when the model
    process goes away."""

    @contextlib.asynccontextmanager
    async def open_models(
        settings: Settings, metrics: Metrics, lifecycle: Lifecycle
    ) -> AsyncIterator[Serving]:
        client = HandoffClient(
            slab, on_lost=lambda reason: lifecycle.fail(f"the model process is gone ({reason})")
        )
        await client.connect(path, index)
        if isinstance(metrics, FrontendMetrics):
            metrics.owner = client
        models = {
            name: ServedModel(
                RemoteRunner(offer.facts), client.batchers[name], offer.transform, offer.facts
            )
            for name, offer in client.offers.items()
        }
        decode_pool = DecodePool(settings.decode_threads)
        serving = Serving(settings, models, decode_pool, ready=client.owner_ready)
        try:
            yield serving
        finally:
            serving.ready = False
            await client.close()
            decode_pool.shutdown(wait=True)

    return open_models


# Metric families only the model process records (its batchers, gauges and gRPC).
_OWNER_ONLY = (
    "queue_seconds",
    "inference_seconds",
    "batch_size",
    "images",
    "failed_batches",
    "oom_splits",
    "stalled_batches",
    "queue_depth",
    "images_in_flight",
    "model_ready",
    "model_stalled",
    "grpc_requests",
    "grpc_request_seconds",
)


class FrontendMetrics(Metrics):
    """A front-end's /metrics (``metrics_router``): its own HTTP metrics (requests, durations,
    the images it rejected), ``evalserve_frontend_info`` naming it, and the model process's
    metrics (batches, queues, readiness, gRPC), asked for at each scrape; a sample both report
    (an image rejection) is their sum."""

    def __init__(self, index: int) -> None:
        super().__init__()
        for attribute in _OWNER_ONLY:
            self.registry.unregister(getattr(self, attribute))
        Gauge(
            "evalserve_frontend_info",
            "The front-end process that answered this scrape.",
            ["worker", "pid"],
            registry=self.registry,
        ).labels(str(index), str(os.getpid())).set(1)
        self.owner: HandoffClient | None = None

    def render(self) -> bytes:
        """This process's metrics and the model process's latest."""
        own = generate_latest(self.registry)
        if self.owner is None:
            return own
        return merge_expositions(own, self.owner.owner_metrics)

    async def render_fresh(self) -> bytes:
        """This process's metrics and the model process's, asked for now."""
        if self.owner is not None:
            await self.owner.fetch_metrics()
        return self.render()


def metrics_router(metrics: FrontendMetrics) -> APIRouter:
    """A front-end's GET /metrics, in place of the usual one (which cannot wait for the model
    process's answer)."""
    router = APIRouter(tags=["health"])

    @router.get("/metrics", response_class=Response)
    async def frontend_metrics() -> Response:
        """Prometheus metrics, in the text exposition format."""
        return Response(await metrics.render_fresh(), media_type=metrics.content_type)

    return router


def merge_expositions(*texts: bytes) -> bytes:
    """Prometheus text expositions as one: families by name, a sample present in several
    summed (its ``_created`` time the earliest)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type)
            )
            samples = values.setdefault(merged.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in samples:
                    combine = min if sample.name.endswith("_created") else _add
                    samples[key] = combine(samples[key], sample.value)
                else:
                    samples[key] = sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


def _add(a: float, b: float) -> float:
    return a + b


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families
