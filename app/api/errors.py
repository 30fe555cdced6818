"""One error family, one JSON error shape, and the handlers that produce it."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request


class ServiceError(Exception):
    """An error that carries its HTTP status, a stable machine code and a message for people."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServiceError):
    status_code, code = 400, "bad_request"


class InvalidImage(ServiceError):
    status_code, code = 400, "invalid_image"


class Unauthorized(ServiceError):
    status_code, code = 401, "unauthorized"


class Forbidden(ServiceError):
    status_code, code = 403, "forbidden"


class RequestTimeout(ServiceError):
    status_code, code = 408, "request_timeout"


class ModelNotFound(ServiceError):
    status_code, code = 404, "model_not_found"


class InvalidParameter(ServiceError):
    status_code, code = 422, "invalid_parameter"


class PayloadTooLarge(ServiceError):
    status_code, code = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status_code, code = 415, "unsupported_media_type"


class ServiceUnavailable(ServiceError):
    status_code, code = 503, "unavailable"


class Overloaded(ServiceError):
    status_code, code = 503, "overloaded"


class GatewayTimeout(ServiceError):
    status_code, code = 504, "timeout"


class InferenceFailed(ServiceError):
    status_code, code = 500, "inference_failed"


class InsufficientStorage(ServiceError):
    """The batch holding the request did not fit in the device's memory, even halved: 507, as
    TorchServe answers a CUDA out-of-memory error."""

    status_code, code = 507, "insufficient_storage"


class ModelControlOff(ServiceError):
    """The server was started without model control. 501, as Triton answers when its model
    control mode does not allow the operation: not 403, which here means a wrong API key."""

    status_code, code = 501, "model_control_disabled"


class ModelLoadError(ServiceError):
    """The model could not be loaded (its files, its config); the message is the cause."""

    status_code, code = 400, "model_load_failed"


class ModelControlDenied(ServiceError):
    """A model-control operation that is not allowed (unloading the default model)."""

    status_code, code = 400, "model_control_refused"


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def error_body_at(path: str, code: str, message: str) -> dict[str, Any]:
    """The error body for a request to ``path``: the Open Inference Protocol's own
    ``{"error": "..."}`` under /v2, ``error_body`` everywhere else."""
    if _is_v2_path(path):
        return {"error": message}
    return error_body(code, message)


def error_response(
    status_code: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status_code, headers=headers)


def _is_v2_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def _is_v2(request: Request) -> bool:
    return _is_v2_path(request.url.path)


def _respond(
    request: Request,
    status_code: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    # The Open Inference Protocol's routes answer its own error shape: {"error": "..."}.
    if _is_v2(request):
        return JSONResponse({"error": message}, status_code=status_code, headers=headers)
    return error_response(status_code, code, message, headers)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return _respond(request, exc.status_code, exc.code, exc.message, exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    phrase = HTTPStatus(exc.status_code).phrase
    code = phrase.lower().replace(" ", "_").replace("-", "_")
    message = exc.detail if isinstance(exc.detail, str) else phrase
    return _respond(request, exc.status_code, code, message, dict(exc.headers or {}))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err.get("loc", ()))
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    message = "; ".join(problems) or "invalid request"
    # The protocol answers malformed requests with 400.
    status = 400 if _is_v2(request) else 422
    return _respond(request, status, "invalid_parameter", message)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    # Unexpected exceptions are answered (and logged once) by app.api.middleware.
