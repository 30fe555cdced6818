"""The application factory and the lifespan that owns every resource."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any

from fastapi import APIRouter, FastAPI

from app import __version__
from app.api import docs, health, models, predict, ui, v2
from app.api.errors import install_error_handlers
from app.api.grpc.service import serve_grpc
from app.api.middleware import RequestMiddleware
from app.api.v2 import repository as v2_repository
from app.batching import Batcher
from app.config import Settings
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.state import ServedModel, Serving

logger = logging.getLogger("evalserve")

# What serves the app's models while its lifespan runs: given the settings, the app's metrics
# and lifecycle, a context that yields the ``Serving`` and stops it on exit.
OpenModels = Callable[[Settings, Metrics, Lifecycle], AbstractAsyncContextManager[Serving]]


def open_local_models(
    settings: Settings, metrics: Metrics, lifecycle: Lifecycle
) -> AbstractAsyncContextManager[Serving]:
    """The models loaded in this process (``app.serving``, which imports torch: imported here,
    so that an app built with other models, a front-end of ``app.workers``, never loads it)."""
    from app.serving import open_serving

    def batch_loop_died(model: str, exc: BaseException) -> None:
        lifecycle.fail(f"model {model}: its batch loop died ({exc!r})")

    return open_serving(
        settings,
        observer=metrics.observer,
        on_death=batch_loop_died,
        # Models loaded or unloaded later join or leave the gauges too.
        watch=partial(_watch_model, metrics, lifecycle),
        unwatch=metrics.unwatch_model,
    )


def create_app(
    settings: Settings | None = None,
    *,
    open_models: OpenModels = open_local_models,
    metrics: Metrics | None = None,
    routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """Build the app. Models load when its lifespan starts, not here: by default in this
    process; ``open_models`` serves them from elsewhere (``app.handoff``'s front-end), whose
    ``routers`` come before the usual routes (its /metrics)."""
    settings = settings or Settings()
    metrics = metrics or Metrics()
    lifecycle = Lifecycle()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            try:
                if settings.grpc_port:
                    # Bound first, so a taken port fails before minutes of loading; until the
                    # models are ready it answers not ready. It stops after the batchers.
                    await stack.enter_async_context(serve_grpc(app.state, settings))
                serving = await stack.enter_async_context(open_models(settings, metrics, lifecycle))
            except Exception as exc:
                # One line naming the model and the cause; the traceback only at debug level
                # (app.server keeps uvicorn from printing it again).
                logger.error("cannot start: %s", exc)
                logger.debug("start-up failed", exc_info=True)
                raise
            app.state.serving = serving
            logger.info("evalserve ready: %s", ", ".join(serving.models))
            try:
                yield
            finally:
                # Readiness turns 503 before the batchers drain (inside open_serving's exit).
                lifecycle.draining = True
                logger.info("evalserve shutting down")
        app.state.serving = None

    app = FastAPI(
        title="evalserve",
        version=__version__,
        summary="Inference REST microservice for PyTorch image classifiers.",
        lifespan=lifespan,
        # Served from the package (app.api.docs), so they work without internet access.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.serving = None
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    app.state.api_keys = [key.encode() for key in settings.api_key_list()]
    install_error_handlers(app)
    app.add_middleware(
        RequestMiddleware,
        metrics=metrics,
        lifecycle=lifecycle,
        max_header_bytes=settings.max_header_bytes,
    )
    for router in routers:
        app.include_router(router)
    app.include_router(predict.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(health.metrics_router)
    app.include_router(v2.open_router)
    app.include_router(v2.router)
    # Documented only when on: /docs shows what this server will do (and its fuzz tests hold
    # that no documented operation answers 5xx, as these do, 501, when model control is off).
    app.include_router(v2_repository.router, include_in_schema=settings.model_control)
    docs.install(app)
    if settings.ui:
        ui.install(app)
    return app


def _watch_model(
    metrics: Metrics, lifecycle: Lifecycle, serving: Serving, model: ServedModel
) -> None:
    """Read the model's gauges at scrape time, from start-up or from when it was loaded."""
    metrics.watch_model(
        model.name,
        depth=partial(getattr, model.batcher, "depth"),
        in_flight=partial(_images_in_flight, model.batcher),
        ready=partial(_model_ready, serving, model.name, lifecycle),
        stalled=partial(getattr, model.batcher, "stalled"),
    )


def _model_ready(serving: Serving, name: str, lifecycle: Lifecycle) -> bool:
    """The evalserve_model_ready gauge: loaded and warm, its batch loop alive and not stalled,
    not draining."""
    # By name, so a reloaded model's gauge reads the model that serves now.
    model = serving.models.get(name)
    return (
        model is not None
        and serving.ready
        and not lifecycle.draining
        and model.batcher.alive
        and not model.batcher.stalled
    )


def _images_in_flight(batcher: Batcher[Any, Any]) -> int:
    """The evalserve_images_in_flight gauge: waiting for a batch, or in the one computing."""
    return batcher.depth + batcher.in_flight
