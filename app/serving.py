"""Opening a server's models: ``open_serving(settings)`` loads, warms and starts every model of
the repository, yields the state (``app.state.Serving``), and on exit stops taking work,
finishes what was queued, and frees the threads. While it serves, its ``RepositoryControl``
(``Serving.control``) loads, reloads and unloads models on request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from functools import partial
from typing import Any

from app.batching import Batcher, BatchObserver
from app.config import Settings
from app.model.repository import ModelConfigError, ModelSpec, discover
from app.model.runtime import Classifier, resolve_device
from app.preprocessing import DecodePool, ImageTransform
from app.state import (
    ModelControlDisabled,
    ModelControlRefused,
    ModelLoadFailed,
    ModelState,
    RepositoryEntry,
    ServedModel,
    Serving,
    UnknownModel,
)
from app.values import Item, OutOfMemory, TopK

logger = logging.getLogger("evalserve")

# Told about each batch of the model it is made for (metrics).
Observer = Callable[[str], BatchObserver]
# Told when a model's batch loop dies (the server then stops).
OnDeath = Callable[[str, BaseException], None]
# Told when a model starts serving (its gauges are read from then on) and when it stops.
Watch = Callable[[Serving, ServedModel], None]
Unwatch = Callable[[str], None]


def read_repository(settings: Settings) -> dict[str, ModelSpec]:
    """The repository's models by name, read and checked (a repository that is itself one model
    folder serves it as the default model)."""
    return discover(settings.model_repository, settings.default_model)


def load_model(spec: ModelSpec, settings: Settings) -> Classifier:
    """``spec``'s model loaded on the configured device and warmed up (compiled, if asked)."""
    try:
        device = resolve_device(settings.device)
    except RuntimeError as exc:
        raise ModelConfigError(spec.name, str(exc)) from exc
    classifier = Classifier(
        spec,
        device,
        settings.torch_threads,
        settings.precision,
        settings.compile,
        settings.runtime,
        max_batch_size=settings.max_batch_size,
        max_image_pixels=settings.max_image_pixels,
    )
    try:
        classifier.warm_up(settings.max_batch_size)
    except BaseException:
        classifier.close()
        raise
    return classifier


async def start_model(
    spec: ModelSpec,
    settings: Settings,
    observer: Observer | None = None,
    on_death: OnDeath | None = None,
) -> ServedModel:
    """``spec``'s model loaded, warmed and with its batcher started: ready to serve."""
    name = spec.name
    logger.info("loading model %s (%s)", name, spec.config.model.source)
    # Loading reads files and runs a forward pass: keep it off the event loop.
    classifier = await asyncio.to_thread(load_model, spec, settings)
    staged = classifier.stage_executor is not None
    try:
        batcher: Batcher[Item, TopK] = Batcher(
            # On CUDA each batch is staged (copied, its JPEGs decoded) in the stage thread while
            # the previous one computes; elsewhere one step does both (app/model/feed.py).
            classifier.compute if staged else classifier.predict,
            classifier.executor,
            stage=classifier.stage if staged else None,
            stage_executor=classifier.stage_executor,
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000.0,
            max_queue_size=settings.max_queue_size,
            name=name,
            observer=observer(name) if observer else None,
            close_when_idle=True,
            on_death=partial(on_death, name) if on_death else None,
            # Out of device memory: the batch is tried again as two halves (507 if in vain).
            split_on=OutOfMemory,
            # A forward pass longer than any request waits for: not ready until it returns.
            stall_after_s=settings.request_timeout_s,
        )
        facts = classifier.describe()
        model = ServedModel(
            classifier, batcher, ImageTransform.from_spec(spec.preprocessing), facts
        )
    except BaseException:
        classifier.close()
        raise
    batcher.start()
    logger.info(
        "model %s ready on %s (%s): %d classes, input %s",
        name,
        facts.device,
        facts.runtime,
        len(facts.labels),
        "x".join(map(str, facts.input_size)),
    )
    return model


async def stop_model(model: ServedModel) -> None:
    """Refuse new work, answer every item the model's batcher holds, and free its thread."""
    await model.batcher.stop()
    model.classifier.close()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to trim with
        return None
    trim: Callable[[int], int] | None = getattr(libc, "malloc_trim", None)
    return trim


def release_memory() -> None:
    """Collect an unloaded model's objects and hand the freed heap back to the OS. glibc keeps
    freed memory in its arenas for reuse, so without malloc_trim the RSS of a process that
    unloaded a model hardly drops. Blocks for a moment: run it in a thread."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class RepositoryControl:
    """The ``ModelControl`` (app.state) of a running server: loads models from the repository
    into ``serving.models`` and takes them out again, one operation at a time per model.

    A model joins ``serving.models`` only once it is warm, in one step on the event loop, so a
    request finds either the old model or the new one, never one half loaded. A model that
    leaves (unloaded, or replaced by a reload) is stopped only after the requests that hold it
    are answered (``ServedModel.lease``, bounded by the body and request timeouts), and its
    batcher answers what it queued before its thread and memory are freed."""

    def __init__(
        self,
        serving: Serving,
        observer: Observer | None = None,
        on_death: OnDeath | None = None,
        watch: Watch | None = None,
        unwatch: Unwatch | None = None,
    ) -> None:
        self._serving = serving
        self._settings = serving.settings
        self._observer = observer
        self._on_death = on_death
        self._watch = watch
        self._unwatch = unwatch
        # One lock per model name, with how many operations hold or wait for it (so the
        # dictionary does not grow with every name ever asked for).
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        # What is under way: LOADING (or reloading, while the old model still serves) or
        # UNLOADING; and why a model is not served ("unloaded", the cause of a failed load).
        self._busy: dict[str, ModelState] = {}
        self._reasons: dict[str, str] = {}
        self._operations: set[asyncio.Task[None]] = set()
        self._closed = False

    async def index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        self._check_open()
        broken: ModelConfigError | None = None
        try:
            specs = await asyncio.to_thread(read_repository, self._settings)
        except ModelConfigError as exc:
            # Still list what is served, and the model that spoils the repository with why.
            specs, broken = {}, exc
        names = set(specs) | set(self._serving.models) | set(self._busy)
        if broken is not None and broken.model != "*":
            names.add(broken.model)
        entries = [self._entry(name, specs.get(name), broken) for name in sorted(names)]
        return [entry for entry in entries if entry.state == "READY"] if ready_only else entries

    async def load(self, name: str) -> None:
        await self._complete(self._load(name))

    async def unload(self, name: str) -> None:
        await self._complete(self._unload(name))

    async def close(self) -> None:
        """Refuse further operations and wait for those under way (the server is stopping)."""
        self._closed = True
        await asyncio.gather(*self._operations, return_exceptions=True)

    # --- the operations ------------------------------------------------------------------

    async def _complete(self, operation: Coroutine[Any, Any, None]) -> None:
        """Run ``operation`` to its end even if the caller goes away (a client that hangs up, a
        cancelled RPC): stopped half way, a model could stay loaded but unserved, or serving
        while its reload is forgotten."""
        task = asyncio.ensure_future(operation)
        self._operations.add(task)
        task.add_done_callback(self._finished)
        await asyncio.shield(task)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._operations.discard(task)
        if not task.cancelled():
            task.exception()  # its caller, if still there, got it; never "never retrieved"

    async def _load(self, name: str) -> None:
        self._check_open()
        async with self._exclusive(name):
            self._check_open()
            reloading = name in self._serving.models
            try:
                model = await self._start(name)
            except ModelLoadFailed as exc:
                # What was served still is; the index says why the load failed.
                logger.warning(
                    "model %s: %s failed: %s", name, "reload" if reloading else "load", exc
                )
                self._reasons[name] = f"reload failed: {exc}" if reloading else str(exc)
                raise
            if self._closed:  # the server began to stop while the model loaded
                await stop_model(model)
                raise ModelControlRefused("the server is shutting down")
            old = self._serving.models.get(name)
            # From this step on, new requests for ``name`` go to the new model.
            self._serving.models[name] = model
            if self._watch is not None:
                self._watch(self._serving, model)
            self._reasons.pop(name, None)
            logger.info("model %s %s", name, "reloaded" if old is not None else "loaded")
            if old is not None:
                await self._retire(old)
                del old
                await asyncio.to_thread(release_memory)

    async def _start(self, name: str) -> ServedModel:
        """The model ``name`` read from the repository, loaded and warm, or ``ModelLoadFailed``
        with the cause."""
        try:
            specs = await asyncio.to_thread(read_repository, self._settings)
        except ModelConfigError as exc:
            # The repository is read whole, as at start-up: a broken model.toml anywhere in it
            # fails the load, and the message names that model.
            raise ModelLoadFailed(str(exc)) from exc
        spec = specs.get(name)
        if spec is None:
            raise UnknownModel(
                f"no model {name!r} in the repository {str(self._settings.model_repository)!r} "
                f"(found: {', '.join(specs)})"
            )
        self._busy[name] = "LOADING"
        try:
            return await start_model(spec, self._settings, self._observer, self._on_death)
        except ModelConfigError as exc:
            raise ModelLoadFailed(str(exc)) from exc
        except Exception as exc:
            # Not a known bad configuration (out of memory, a bug): log it whole, answer why.
            logger.exception("model %s: loading failed", name)
            raise ModelLoadFailed(f"model {name!r}: loading failed: {exc}") from exc
        finally:
            del self._busy[name]

    async def _unload(self, name: str) -> None:
        self._check_open()
        if name == self._settings.default_model:
            raise ModelControlRefused(
                f"model {name!r} is the default model, which /v1/predict answers with: it "
                "cannot be unloaded (load it to reload it)"
            )
        async with self._exclusive(name):
            self._check_open()
            model = self._serving.models.get(name)
            if model is None:
                raise UnknownModel(f"model {name!r} is not loaded")
            self._busy[name] = "UNLOADING"
            try:
                # From this step on, new requests for ``name`` are answered 404.
                del self._serving.models[name]
                if self._unwatch is not None:
                    self._unwatch(name)
                self._reasons[name] = "unloaded"
                await self._retire(model)
            finally:
                del self._busy[name]
            logger.info("model %s unloaded", name)
            del model
            await asyncio.to_thread(release_memory)

    async def _retire(self, model: ServedModel) -> None:
        """Stop ``model``, no longer served: once no request holds it (or their time is up),
        its batcher answers what it queued, then its thread is freed."""
        loop = asyncio.get_running_loop()
        limit = self._settings.body_timeout_s + self._settings.request_timeout_s
        deadline = loop.time() + limit
        # Polled, like Lifecycle.drain: leases and announcements are plain counters, changed
        # on every request, where an Event would cost each request to serve this rare wait.
        while model.busy and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if model.busy:
            logger.warning(
                "model %s: %d request(s) still hold it after %.0f s; stopping it anyway",
                model.name,
                model.users,
                limit,
            )
        await stop_model(model)

    # --- helpers -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._settings.model_control:
            raise ModelControlDisabled(
                "model control is off: start the server with EVALSERVE_MODEL_CONTROL=true "
                "to load and unload models"
            )
        if self._closed:
            raise ModelControlRefused("the server is shutting down")

    @contextlib.asynccontextmanager
    async def _exclusive(self, name: str) -> AsyncIterator[None]:
        lock, count = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, count + 1)
        try:
            async with lock:
                yield
        finally:
            lock, count = self._locks[name]
            if count == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, count - 1)

    def _entry(
        self, name: str, spec: ModelSpec | None, broken: ModelConfigError | None
    ) -> RepositoryEntry:
        model = self._serving.models.get(name)
        busy = self._busy.get(name)
        if model is not None:
            version = model.facts.version
        else:
            version = spec.config.model.version if spec is not None else ""
        if busy == "UNLOADING":
            return RepositoryEntry(name, version, "UNLOADING", "")
        if model is not None:  # a reload keeps serving the loaded model until the new is warm
            reason = "reloading" if busy == "LOADING" else self._reasons.get(name, "")
            return RepositoryEntry(name, version, "READY", reason)
        if busy == "LOADING":
            return RepositoryEntry(name, version, "LOADING", "")
        if broken is not None and broken.model == name:
            return RepositoryEntry(name, version, "UNAVAILABLE", str(broken))
        return RepositoryEntry(name, version, "UNAVAILABLE", self._reasons.get(name, "not loaded"))


def _watch_all(serving: Serving, watch: Watch) -> None:
    # A function of its own, so that no loop variable in open_serving's frame, which lives as
    # long as the server, keeps a model alive after it is unloaded or replaced.
    for model in serving.models.values():
        watch(serving, model)


@contextlib.asynccontextmanager
async def open_serving(
    settings: Settings,
    observer: Observer | None = None,
    on_death: OnDeath | None = None,
    watch: Watch | None = None,
    unwatch: Unwatch | None = None,
) -> AsyncIterator[Serving]:
    """Load and warm every model (raising on the first that fails), then serve until exit.
    ``observer(name)``, when given, is told about each of that model's batches; ``on_death``
    is told when a model's batch loop dies; ``watch`` when a model starts serving (at start-up
    or loaded later), ``unwatch`` when one is unloaded."""
    specs = await asyncio.to_thread(read_repository, settings)
    if settings.default_model not in specs:
        raise ValueError(
            f"default model {settings.default_model!r} is not in the repository "
            f"{str(settings.model_repository)!r} (found: {', '.join(specs)})"
        )
    decode_pool = DecodePool(settings.decode_threads)
    models: dict[str, ServedModel] = {}
    serving = Serving(settings=settings, models=models, decode_pool=decode_pool)
    control = RepositoryControl(serving, observer, on_death, watch, unwatch)
    serving.control = control
    try:
        for name, spec in specs.items():
            models[name] = await start_model(spec, settings, observer, on_death)
        if watch is not None:
            _watch_all(serving, watch)
        serving.ready = True
        yield serving
    finally:
        serving.ready = False
        await control.close()
        for model in list(models.values()):
            await stop_model(model)
        decode_pool.shutdown(wait=True)
