"""Dependencies that read the server's state, as Annotated aliases so routes stay thin.

Every dependency is ``async def``: FastAPI runs a plain ``def`` dependency in a worker thread,
one thread hop per dependency per request (measured: 6% of a core at 100 requests/s, and part
of every lone request's latency), for functions that never block."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Path, Request
from starlette.datastructures import State

from app.api.errors import Forbidden, ModelNotFound, ServiceUnavailable, Unauthorized
from app.api.inference import Inference
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.state import ServedModel, Serving


async def get_serving(request: Request) -> Serving:
    serving: Serving | None = getattr(request.app.state, "serving", None)
    if serving is None:
        raise ServiceUnavailable("the server is starting", headers={"Retry-After": "1"})
    return serving


async def get_lifecycle(request: Request) -> Lifecycle:
    lifecycle: Lifecycle = request.app.state.lifecycle
    return lifecycle


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def not_ready_reason(request: Request) -> str | None:
    """Why the server is not ready ("failed", "draining", "loading" or "stalled"), or None."""
    return not_ready_reason_of(request.app.state)


def not_ready_reason_of(state: State) -> str | None:
    """Why the server is not ready ("failed", "draining", "loading" or "stalled"), or None when
    it is: every model loaded and warmed, every batch loop alive, no forward pass running past
    the request timeout, and not shutting down. The one definition every probe uses, over HTTP
    and gRPC (``state`` is the app's state)."""
    serving: Serving | None = getattr(state, "serving", None)
    if serving is not None and serving.failed_models():
        return "failed"
    if state.lifecycle.draining:
        return "draining"
    if serving is None or not serving.ready:
        return "loading"
    if serving.stalled_models():
        return "stalled"
    return None


def find_model(serving: Serving, name: str, version: str | None = None) -> ServedModel:
    """The served model called ``name`` (at ``version``, when given), or ``ModelNotFound``."""
    model = serving.models.get(name)
    if model is None:
        raise ModelNotFound(f"model {name!r} is not served (served: {', '.join(serving.models)})")
    served = model.describe().version
    if version is not None and version != served:
        raise ModelNotFound(f"model {name!r} has no version {version!r} (only {served!r})")
    return model


ServingDep = Annotated[Serving, Depends(get_serving)]
LifecycleDep = Annotated[Lifecycle, Depends(get_lifecycle)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


async def require_api_key(request: Request) -> None:
    """When API keys are configured: 401 without a bearer token, 403 with a wrong one."""
    check_api_key(request.app.state.api_keys, request.headers.get("authorization", ""))


def check_api_key(keys: list[bytes], authorization: str) -> None:
    """``authorization`` (an HTTP header or gRPC metadata value) against the configured keys:
    nothing to check when there are none, ``Unauthorized`` without a bearer token,
    ``Forbidden`` with a wrong one."""
    if not keys:
        return
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "this server needs an API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    offered = token.strip().encode()
    # Compare against every key, without stopping early, in constant time per key.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(offered, key)
    if not matched:
        raise Forbidden("the API key is not valid")


ModelName = Annotated[str, Path(description="Model name, as listed by GET /v1/models.")]


async def get_model(serving: ServingDep, name: ModelName) -> ServedModel:
    try:
        return serving.models[name]
    except KeyError:
        raise ModelNotFound(
            f"no model named {name!r}; available: {', '.join(sorted(serving.models))}"
        ) from None


async def get_default_model(serving: ServingDep) -> ServedModel:
    return serving.default_model


ModelDep = Annotated[ServedModel, Depends(get_model)]
DefaultModelDep = Annotated[ServedModel, Depends(get_default_model)]


async def named_inference(request: Request, model: ModelDep) -> AsyncIterator[Inference]:
    async with Inference.open(request, model) as inference:
        yield inference


async def default_inference(request: Request, model: DefaultModelDep) -> AsyncIterator[Inference]:
    async with Inference.open(request, model) as inference:
        yield inference


InferenceDep = Annotated[Inference, Depends(named_inference)]
DefaultInferenceDep = Annotated[Inference, Depends(default_inference)]
