"""The application factory and the lifespan that owns every resource."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI

from app import __version__
from app.api import health, models, predict, ui, v2
from app.api.errors import install_error_handlers
from app.api.middleware import RequestMiddleware
from app.config import Settings
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.serving import open_serving

logger = logging.getLogger("evalserve")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Models load when its lifespan starts, not here."""
    settings = settings or Settings()
    metrics = Metrics()
    lifecycle = Lifecycle()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_serving(settings, observer=metrics.observer) as serving:
            for model in serving.models.values():
                metrics.watch_model(
                    model.name,
                    depth=partial(getattr, model.batcher, "depth"),
                    ready=lambda: serving.ready and not lifecycle.draining,
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
    if settings.ui:
        ui.install(app)
    return app
