"""Prometheus metrics, one registry per app (so several apps in one process never collide).

Hot-path cost is a few counter/histogram updates per request and per batch; queue depth and
readiness are read only when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Latency buckets from 1 ms to 60 s; batch sizes in powers of two.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# Every label takes known values only, so no client can grow /metrics: a route is a template or
# "unmatched", a status one the app sends, and a method outside these (h11 takes any token as
# one) is "other".
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)

REJECT_REASONS = (
    "queue_full",
    "timeout",
    "bad_image",
    "too_large",
    "batch_failed",
    "out_of_memory",
)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "evalserve_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "evalserve_request_duration_seconds",
            "Time from the request's arrival to the end of its response, by route template.",
            ["route"],
            buckets=_SECONDS,
            registry=r,
        )
        self.grpc_requests = Counter(
            "evalserve_grpc_requests",
            "gRPC calls answered, by method and status code (OK, INVALID_ARGUMENT, ...).",
            ["method", "code"],
            registry=r,
        )
        self.grpc_request_seconds = Histogram(
            "evalserve_grpc_request_duration_seconds",
            "Time from a gRPC call's arrival to its answer, by method.",
            ["method"],
            buckets=_SECONDS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "evalserve_queue_time_seconds",
            "Time an image waited in the queue before its batch's forward pass began.",
            ["model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "evalserve_inference_duration_seconds",
            "Duration of one batch's forward pass (stack, transfer, forward, top-k).",
            ["model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.batch_size = Histogram(
            "evalserve_batch_size",
            "Images per forward pass.",
            ["model"],
            buckets=_BATCH,
            registry=r,
        )
        self.images = Counter(
            "evalserve_images_processed",
            "Images that went through a successful forward pass.",
            ["model"],
            registry=r,
        )
        self.rejected = Counter(
            "evalserve_images_rejected",
            "Images refused or dropped, by reason: queue_full, timeout, bad_image, too_large, "
            "batch_failed (their forward pass raised), out_of_memory (their batch did not fit "
            "in device memory, even halved).",
            ["model", "reason"],
            registry=r,
        )
        self.failed_batches = Counter(
            "evalserve_failed_batches",
            "Forward passes that raised; their requests were answered 500.",
            ["model"],
            registry=r,
        )
        self.oom_splits = Counter(
            "evalserve_oom_splits",
            "Batches that ran out of device memory and were computed again as two halves.",
            ["model"],
            registry=r,
        )
        self.stalled_batches = Counter(
            "evalserve_stalled_batches",
            "Batches whose forward pass ran longer than the request timeout.",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "evalserve_queue_depth", "Images waiting for a batch.", ["model"], registry=r
        )
        self.images_in_flight = Gauge(
            "evalserve_images_in_flight",
            "Images the model has accepted and not yet answered: waiting for a batch or in the "
            "batch being computed (what autoscaling on the work reads; see the README).",
            ["model"],
            registry=r,
        )
        self.model_ready = Gauge(
            "evalserve_model_ready",
            "1 when the model is loaded and warmed, its batch loop alive and not stalled, and "
            "the server is not draining, else 0.",
            ["model"],
            registry=r,
        )
        self.model_stalled = Gauge(
            "evalserve_model_stalled",
            "1 while the model's forward pass has run longer than the request timeout (the "
            "server is not ready meanwhile), else 0.",
            ["model"],
            registry=r,
        )

    def watch_model(
        self,
        model: str,
        depth: Callable[[], int],
        in_flight: Callable[[], int],
        ready: Callable[[], bool],
        stalled: Callable[[], bool],
    ) -> None:
        """Read queue depth, images in flight, readiness and stalls at scrape time, not on the
        hot path."""
        self.queue_depth.labels(model).set_function(depth)
        self.images_in_flight.labels(model).set_function(in_flight)
        self.model_ready.labels(model).set_function(lambda: 1.0 if ready() else 0.0)
        self.model_stalled.labels(model).set_function(lambda: 1.0 if stalled() else 0.0)
        for reason in REJECT_REASONS:  # so a rate() query sees 0, not "no data"
            self.rejected.labels(model, reason)
        self.oom_splits.labels(model)
        self.stalled_batches.labels(model)

    def unwatch_model(self, model: str) -> None:
        """Stop reporting an unloaded model's gauges (a scrape would otherwise show a queue and
        a readiness for a model that is gone). Its counters and histograms stay: their totals
        are still true, and a model loaded again counts on from them, so rate() sees no reset."""
        for gauge in (
            self.queue_depth,
            self.images_in_flight,
            self.model_ready,
            self.model_stalled,
        ):
            gauge.remove(model)

    def batch_done(
        self, model: str, queue_seconds: Sequence[float], compute_seconds: float
    ) -> None:
        self.batch_size.labels(model).observe(len(queue_seconds))
        self.inference_seconds.labels(model).observe(compute_seconds)
        self.images.labels(model).inc(len(queue_seconds))
        histogram = self.queue_seconds.labels(model)
        for seconds in queue_seconds:
            histogram.observe(seconds)

    def batch_failed(self, model: str, size: int) -> None:
        self.failed_batches.labels(model).inc()
        self.rejected.labels(model, "batch_failed").inc(size)

    def batch_split(self, model: str) -> None:
        self.oom_splits.labels(model).inc()

    def batch_stalled(self, model: str) -> None:
        self.stalled_batches.labels(model).inc()

    def observer(self, model: str) -> ModelObserver:
        return ModelObserver(self, model)

    def reject(self, model: str, reason: str, images: int) -> None:
        self.rejected.labels(model, reason).inc(images)

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in HTTP_METHODS else "other"
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def grpc_done(self, method: str, code: str, seconds: float) -> None:
        self.grpc_requests.labels(method, code).inc()
        self.grpc_request_seconds.labels(method).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelObserver:
    """A batcher's view of the metrics, bound to one model (see app.batching.BatchObserver)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._metrics = metrics
        self._model = model

    def batch_done(self, queue_seconds: Sequence[float], compute_seconds: float) -> None:
        self._metrics.batch_done(self._model, queue_seconds, compute_seconds)

    def batch_failed(self, size: int) -> None:
        self._metrics.batch_failed(self._model, size)

    def batch_split(self, size: int) -> None:  # noqa: ARG002 (counted per batch)
        self._metrics.batch_split(self._model)

    def batch_stalled(self, size: int) -> None:  # noqa: ARG002 (counted per batch)
        self._metrics.batch_stalled(self._model)
