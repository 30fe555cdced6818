"""The gRPC ``inference.GRPCInferenceService``: each method a thin handler over what REST uses
(``Inference`` and its batchers, the v2 codec, the readiness and API-key checks), so a gRPC
request can share a batch with HTTP ones and is refused, drained and counted the same way.

Handlers are registered by method path with a generic handler, so only the messages come from
the descriptor set (``messages``); no generated service code pins a protobuf version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from starlette.datastructures import State

from app import __version__
from app.api.deps import check_api_key, find_model, not_ready_reason_of
from app.api.errors import ServiceError, ServiceUnavailable
from app.api.grpc import codec, messages
from app.api.inference import RETRY_AFTER, Inference
from app.api.v2 import codec as v2
from app.api.v2.repository import check_load_parameters, control_errors
from app.config import Settings
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.state import Serving

logger = logging.getLogger("evalserve")
access_logger = logging.getLogger("evalserve.access")


@dataclass(slots=True)
class Call:
    """One gRPC call as a method sees it: the request message, gRPC's context, and the
    access-log record (the model and the number of images, once known)."""

    request: Any
    context: grpc.aio.ServicerContext
    info: dict[str, Any] = field(default_factory=dict)


Method = Callable[[Call], Awaitable[Any]]
Rpc = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]

# HTTP statuses of ServiceError to gRPC codes, the mapping gRPC's own HTTP gateway documents.
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.UNAVAILABLE,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_of(error: ServiceError) -> grpc.StatusCode:
    """The gRPC code for an error that carries an HTTP status."""
    fallback = grpc.StatusCode.INTERNAL if error.status_code >= 500 else grpc.StatusCode.UNKNOWN
    return _CODES.get(error.status_code, fallback)


class InferenceService:
    """The protocol's methods over one app's state (``app.state``: serving, lifecycle, metrics,
    API keys), read at every call, as the HTTP routes read it."""

    def __init__(self, state: State) -> None:
        self.state = state

    # --- the methods ---------------------------------------------------------------------

    async def server_live(self, _call: Call) -> Any:
        return messages.ServerLiveResponse(live=True)

    async def server_ready(self, _call: Call) -> Any:
        return messages.ServerReadyResponse(ready=not_ready_reason_of(self.state) is None)

    async def server_metadata(self, _call: Call) -> Any:
        return messages.ServerMetadataResponse(**v2.server_metadata(__version__))

    async def model_ready(self, call: Call) -> Any:
        model = find_model(self._serving(), call.request.name, call.request.version or None)
        ready = not_ready_reason_of(self.state) is None and model.batcher.alive
        return messages.ModelReadyResponse(ready=ready)

    async def model_metadata(self, call: Call) -> Any:
        model = find_model(self._serving(), call.request.name, call.request.version or None)
        return codec.model_metadata(v2.model_metadata(model.describe()))

    async def model_infer(self, call: Call) -> Any:
        request = call.request
        model = find_model(self._serving(), request.model_name, request.model_version or None)
        async with Inference.begin(self.state, model, call.info) as inference_call:
            inference, tensor, raw = codec.infer_request(request)
            inference_call.expect(v2.image_count(tensor))  # before decoding anything
            facts = model.describe()
            uploads = v2.decode_images(tensor, raw, facts.input_size)
            requested = v2.requested_outputs(inference, len(facts.labels))
            results = await inference_call.classify(
                uploads, len(facts.labels), deadline_s=call.context.time_remaining()
            )
        answer = {"model_name": facts.name, "model_version": facts.version}
        if inference.id is not None:
            answer["id"] = inference.id
        if len(results) * len(facts.labels) > v2.INLINE_OUTPUT_VALUES:
            # Large: built in the decode pool, stalling no other request.
            return await inference_call.offload(
                codec.infer_response, answer, results, facts.labels, requested
            )
        return codec.infer_response(answer, results, facts.labels, requested)

    async def repository_index(self, call: Call) -> Any:
        with control_errors():
            entries = await self._serving().control.index(ready_only=call.request.ready)
        response = messages.RepositoryIndexResponse()
        for entry in entries:
            response.models.add(
                name=entry.name, version=entry.version, state=entry.state, reason=entry.reason
            )
        return response

    async def repository_model_load(self, call: Call) -> Any:
        check_load_parameters(call.request.parameters)
        with control_errors():
            await self._serving().control.load(call.request.model_name)
        return messages.RepositoryModelLoadResponse()

    async def repository_model_unload(self, call: Call) -> Any:
        with control_errors():
            await self._serving().control.unload(call.request.model_name)
        return messages.RepositoryModelUnloadResponse()

    def _serving(self) -> Serving:
        serving: Serving | None = getattr(self.state, "serving", None)
        if serving is None:
            raise ServiceUnavailable("the server is starting", headers=RETRY_AFTER)
        return serving

    # --- what every call goes through ------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler serving every method, by path."""
        # (name, implementation, request message, response message, needs the API key,
        # counts as work the drain waits for)
        methods: list[tuple[str, Method, Any, Any, bool, bool]] = [
            ("ServerLive", self.server_live, messages.ServerLiveRequest,
             messages.ServerLiveResponse, False, False),
            ("ServerReady", self.server_ready, messages.ServerReadyRequest,
             messages.ServerReadyResponse, False, False),
            ("ServerMetadata", self.server_metadata, messages.ServerMetadataRequest,
             messages.ServerMetadataResponse, False, False),
            ("ModelReady", self.model_ready, messages.ModelReadyRequest,
             messages.ModelReadyResponse, True, False),
            ("ModelMetadata", self.model_metadata, messages.ModelMetadataRequest,
             messages.ModelMetadataResponse, True, False),
            ("ModelInfer", self.model_infer, messages.ModelInferRequest,
             messages.ModelInferResponse, True, True),
            ("RepositoryIndex", self.repository_index, messages.RepositoryIndexRequest,
             messages.RepositoryIndexResponse, True, False),
            ("RepositoryModelLoad", self.repository_model_load,
             messages.RepositoryModelLoadRequest, messages.RepositoryModelLoadResponse,
             True, True),
            ("RepositoryModelUnload", self.repository_model_unload,
             messages.RepositoryModelUnloadRequest, messages.RepositoryModelUnloadResponse,
             True, True),
        ]  # fmt: skip
        return grpc.method_handlers_generic_handler(
            messages.SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    self._guarded(name, method, keyed, counted),
                    request_deserializer=request_type.FromString,
                    response_serializer=response_type.SerializeToString,
                )
                for name, method, request_type, response_type, keyed, counted in methods
            },
        )

    def _guarded(self, name: str, method: Method, keyed: bool, counted: bool) -> Rpc:
        """``method`` behind the API keys (when ``keyed``), counted in flight for the drain
        (when ``counted``), with errors mapped to status codes, metrics and an access log."""

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            lifecycle: Lifecycle = self.state.lifecycle
            # Not the loop's clock: uvloop's ticks in whole milliseconds.
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            this = Call(request, context)
            try:
                if keyed:
                    metadata = dict(context.invocation_metadata() or ())
                    check_api_key(self.state.api_keys, str(metadata.get("authorization", "")))
                if not counted:
                    return await method(this)
                with lifecycle.accepting():
                    return await method(this)
            except ServiceError as exc:
                code = status_of(exc)
                trailers = (
                    (("retry-after", exc.headers["Retry-After"]),)
                    if ("Retry-After" in exc.headers)
                    else ()
                )
                await context.abort(code, exc.message, trailers)
            except asyncio.CancelledError:
                # The client cancelled, or its deadline passed: gRPC answers it, not us.
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                logger.exception("gRPC %s failed", name)
                await context.abort(code, "internal error; the server log has the details")
            finally:
                seconds = time.perf_counter() - started
                metrics: Metrics = self.state.metrics
                metrics.grpc_done(name, code.name, seconds)
                _log_access(context, name, code, seconds, this.info)

        return call


def _log_access(
    context: grpc.aio.ServicerContext,
    method: str,
    code: grpc.StatusCode,
    seconds: float,
    info: dict[str, Any],
) -> None:
    peer = context.peer() or "-"
    access_logger.info(
        '%s "GRPC %s" %s %.1fms images=%s model=%s',
        peer,
        method,
        code.name,
        seconds * 1000,
        info.get("images", "-"),
        info.get("model", "-"),
        extra={
            "method": "GRPC",
            "path": method,
            "status": code.name,
            "latency_ms": round(seconds * 1000, 2),
            "images": info.get("images"),
            "model": info.get("model"),
            "client": peer,
        },
    )


class GrpcPortInUse(OSError):
    """The gRPC address cannot be bound."""


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@asynccontextmanager
async def serve_grpc(state: State, settings: Settings) -> AsyncIterator[int]:
    """Serve the protocol on ``settings.grpc_port`` until exit; yields the bound port. Calls
    that arrive before the models are ready are answered UNAVAILABLE (or not ready)."""
    server = grpc.aio.server(
        options=[
            # gRPC's default lets a second server bind the same port silently and steal half
            # the connections; a taken port must fail as it does for HTTP.
            ("grpc.so_reuseport", 0),
            # The upload limit, plus room for the message around the images.
            ("grpc.max_receive_message_length", settings.max_upload_bytes + 64 * 1024),
        ]
    )
    server.add_generic_rpc_handlers((InferenceService(state).handler(),))
    where = address(settings.host, settings.grpc_port)
    try:
        port = server.add_insecure_port(where)
    except RuntimeError as exc:
        raise GrpcPortInUse(f"cannot listen on {where} (gRPC): {exc}") from exc
    if port == 0:  # older grpcio reports a failed bind this way
        raise GrpcPortInUse(f"cannot listen on {where} (gRPC)")
    await server.start()
    logger.info("gRPC Open Inference Protocol on %s", address(settings.host, port))
    try:
        yield port
    finally:
        # The drain has already waited for accepted calls; this bounds stragglers.
        await server.stop(grace=settings.request_timeout_s)
