"""Opening a server's models: ``open_serving(settings)`` loads, warms and starts every model of
the repository, yields the state (``app.state.Serving``), and on exit stops taking work,
finishes what was queued, and frees the threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from app.batching import Batcher, BatchObserver
from app.config import Settings
from app.model.repository import ModelConfigError, ModelSpec, discover
from app.model.runtime import Classifier, resolve_device
from app.preprocessing import ImageTransform
from app.state import ServedModel, Serving
from app.values import Item, TopK

logger = logging.getLogger("evalserve")


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
    )
    try:
        classifier.warm_up(settings.max_batch_size)
    except BaseException:
        classifier.close()
        raise
    return classifier


@contextlib.asynccontextmanager
async def open_serving(
    settings: Settings,
    observer: Callable[[str], BatchObserver] | None = None,
    on_death: Callable[[str, BaseException], None] | None = None,
) -> AsyncIterator[Serving]:
    """Load and warm every model (raising on the first that fails), then serve until exit.
    ``observer(name)``, when given, is told about each of that model's batches; ``on_death``
    is told when a model's batch loop dies."""
    specs = await asyncio.to_thread(discover, settings.model_repository)
    if settings.default_model not in specs:
        raise ValueError(
            f"default model {settings.default_model!r} is not in the repository "
            f"{str(settings.model_repository)!r} (found: {', '.join(specs)})"
        )
    decode_pool = ThreadPoolExecutor(
        max_workers=settings.decode_threads, thread_name_prefix="decode"
    )
    models: dict[str, ServedModel] = {}
    serving = Serving(settings=settings, models=models, decode_pool=decode_pool)
    try:
        for name, spec in specs.items():
            logger.info("loading model %s (%s)", name, spec.config.model.source)
            # Loading reads files and runs a forward pass: keep it off the event loop.
            classifier = await asyncio.to_thread(load_model, spec, settings)
            batcher: Batcher[Item, TopK] = Batcher(
                classifier.predict,
                classifier.executor,
                max_batch_size=settings.max_batch_size,
                max_delay_s=settings.max_batch_delay_ms / 1000.0,
                max_queue_size=settings.max_queue_size,
                name=name,
                observer=observer(name) if observer else None,
                close_when_idle=True,
                on_death=partial(on_death, name) if on_death else None,
            )
            facts = classifier.describe()
            models[name] = ServedModel(
                classifier, batcher, ImageTransform.from_spec(spec.preprocessing), facts
            )
            batcher.start()
            logger.info(
                "model %s ready on %s (%s): %d classes, input %s",
                name,
                facts.device,
                facts.runtime,
                len(facts.labels),
                "x".join(map(str, facts.input_size)),
            )
        serving.ready = True
        yield serving
    finally:
        serving.ready = False
        for model in models.values():
            await model.batcher.stop()
            model.classifier.close()
        decode_pool.shutdown(wait=True)
