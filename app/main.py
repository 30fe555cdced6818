"""The application factory and the lifespan that owns every resource."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI

from app import __version__
from app.api import docs, health, models, predict, ui, v2
from app.api.errors import install_error_handlers
from app.api.middleware import RequestMiddleware
from app.batching import Batcher
from app.config import Settings
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.serving import open_serving
from app.state import Serving

logger = logging.getLogger("evalserve")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Models load when its lifespan starts, not here."""
    settings = settings or Settings()
    metrics = Metrics()
    lifecycle = Lifecycle()

    def batch_loop_died(model: str, exc: BaseException) -> None:
        lifecycle.fail(f"model {model}: its batch loop died ({exc!r})")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            try:
                serving = await stack.enter_async_context(
                    open_serving(settings, observer=metrics.observer, on_death=batch_loop_died)
                )
            except Exception as exc:
                # One line naming the model and the cause; the traceback only at debug level
                # (app.server keeps uvicorn from printing it again).
                logger.error("cannot start: %s", exc)
                logger.debug("start-up failed", exc_info=True)
                raise
            for model in serving.models.values():
                metrics.watch_model(
                    model.name,
                    depth=partial(getattr, model.batcher, "depth"),
                    in_flight=partial(_images_in_flight, model.batcher),
                    ready=partial(_model_ready, serving, model.name, lifecycle),
                )
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
    app.include_router(predict.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(health.metrics_router)
    app.include_router(v2.open_router)
    app.include_router(v2.router)
    docs.install(app)
    if settings.ui:
        ui.install(app)
    return app


def _model_ready(serving: Serving, name: str, lifecycle: Lifecycle) -> bool:
    """The evalserve_model_ready gauge: loaded and warm, its batch loop alive, not draining."""
    return serving.ready and not lifecycle.draining and serving.models[name].batcher.alive


def _images_in_flight(batcher: Batcher[Any, Any]) -> int:
    """The evalserve_images_in_flight gauge: waiting for a batch, or in the one computing."""
    return batcher.depth + batcher.in_flight
