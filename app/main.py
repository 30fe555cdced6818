"""The application factory and the lifespan that owns every resource."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api import health, models, predict
from app.api.errors import install_error_handlers
from app.config import Settings
from app.serving import open_serving

logger = logging.getLogger("evalserve")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Models load when its lifespan starts, not here."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_serving(settings) as serving:
            app.state.serving = serving
            logger.info("evalserve ready: %s", ", ".join(serving.models))
            try:
                yield
            finally:
                # Readiness turns 503 before the batchers drain (inside open_serving's exit).
                serving.draining = True
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
    install_error_handlers(app)
    app.include_router(predict.router)
    app.include_router(models.router)
    app.include_router(health.router)
    return app
