"""Probes: live while the process runs; ready only when every model is warm and not draining."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.deps import MetricsDep, not_ready_reason
from app.api.errors import error_response
from app.api.schemas import ErrorResponse, HealthStatus

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", response_model=HealthStatus)
async def live() -> HealthStatus:
    """200 while the process can answer HTTP at all."""
    return HealthStatus(status="live")


@router.get(
    "/ready",
    response_model=HealthStatus,
    responses={
        503: {"model": ErrorResponse, "description": "Loading, shutting down, stalled or failed."}
    },
)
async def ready(request: Request) -> HealthStatus | JSONResponse:
    """200 only when every model is loaded and warmed and the server is not shutting down."""
    reason = not_ready_reason(request)
    if reason == "failed":
        return error_response(503, "failed", "a model stopped serving; the server is stopping")
    if reason == "draining":
        return error_response(503, "draining", "the server is shutting down")
    if reason == "stalled":
        return error_response(
            503, "stalled", "a forward pass has run longer than the request timeout"
        )
    if reason is not None:
        return error_response(503, "not_ready", "models are loading")
    return HealthStatus(status="ready")


metrics_router = APIRouter(tags=["health"])


@metrics_router.get("/metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics, in the text exposition format."""
    return Response(metrics.render(), media_type=metrics.content_type)
