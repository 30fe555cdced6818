"""POST predict: read the upload (bounded), decode in the pool, batch, answer top-k per image."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from app.api.deps import (
    DefaultModelDep,
    LifecycleDep,
    MetricsDep,
    ModelDep,
    ServingDep,
    require_api_key,
)
from app.api.errors import (
    BadRequest,
    GatewayTimeout,
    InferenceFailed,
    InvalidImage,
    InvalidParameter,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from app.api.middleware import request_info
from app.api.schemas import (
    AUTH_RESPONSES,
    ClassScore,
    ErrorResponse,
    ImagePrediction,
    PredictResponse,
)
from app.batching import (
    BatcherClosed,
    BatchFailed,
    DeadlineExceeded,
    QueueFull,
    TooManyItems,
)
from app.preprocessing import ImageError, ImageTooLarge, load_image
from app.serving import ServedModel, Serving

router = APIRouter(prefix="/v1", tags=["predict"], dependencies=[Depends(require_api_key)])

T = TypeVar("T")
RETRY_AFTER = {"Retry-After": "1"}
FILE_FIELD = "file"
RAW_IMAGE_TYPES = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/png",
        "image/webp",
        "image/bmp",
        "image/x-ms-bmp",
        "image/gif",
        "image/tiff",
        "application/octet-stream",
    }
)

_ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    400: {"model": ErrorResponse, "description": "An upload is not a readable image."},
    408: {"model": ErrorResponse, "description": "The body took too long to arrive."},
    404: {"model": ErrorResponse, "description": "No such model."},
    413: {"model": ErrorResponse, "description": "Body, image or image count over the limit."},
    415: {"model": ErrorResponse, "description": "Content-Type is not multipart or an image."},
    422: {"model": ErrorResponse, "description": "Bad query parameter."},
    500: {"model": ErrorResponse, "description": "The forward pass failed on this batch."},
    503: {"model": ErrorResponse, "description": "Queue full or shutting down; see Retry-After."},
    504: {"model": ErrorResponse, "description": "No result within the request timeout."},
}
_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "multipart/form-data with one or more `file` parts, or one raw image.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        FILE_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                        }
                    },
                    "required": [FILE_FIELD],
                }
            },
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

TopKQuery = Annotated[
    int | None,
    Query(ge=1, le=1000, description="Classes per image; the server default when omitted."),
]


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    """Pass chunks through, failing as soon as the running total passes ``limit``."""
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        yield chunk


async def _read_uploads(request: Request, serving: Serving) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in the request, read within the upload limit."""
    settings = serving.settings
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {declared} bytes, the limit is {limit}")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    stream = _limited(request.stream(), limit)
    if media_type in RAW_IMAGE_TYPES:
        return [("body", b"".join([chunk async for chunk in stream]))]
    if media_type != "multipart/form-data":
        raise UnsupportedMediaType(
            f"Content-Type {media_type or '(none)'!r} is not accepted; send multipart/form-data "
            f"with '{FILE_FIELD}' parts, or a raw image (image/jpeg, image/png, ...)"
        )
    parser = MultiPartParser(request.headers, stream, max_files=settings.max_queue_size)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise PayloadTooLarge(
                f"more images than the queue can hold ({settings.max_queue_size})"
            ) from exc
        raise BadRequest(f"malformed multipart body: {exc.message}") from exc
    try:
        uploads: list[tuple[str, bytes]] = []
        for key, value in form.multi_items():
            if key != FILE_FIELD:
                continue
            if not isinstance(value, UploadFile):
                raise BadRequest(f"form field '{FILE_FIELD}' must be a file upload, not text")
            name = value.filename or f"{FILE_FIELD}[{len(uploads)}]"
            uploads.append((name, await value.read()))
    finally:
        await form.close()
    if not uploads:
        raise BadRequest(f"no image found: send one or more files in the form field '{FILE_FIELD}'")
    return uploads


async def _until_disconnected(request: Request) -> None:
    # With the body read, the next ASGI message is the disconnect (or the end of the response).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client goes away first, cancel it (dropping its queued images)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        # Let the cancellation run, so the batcher sees the dropped futures before we answer.
        await asyncio.gather(task, return_exceptions=True)
        raise BadRequest("the client disconnected")
    return task.result()


# Which rejections are counted in evalserve_images_rejected_total, and under what reason.
_REJECT_REASONS: dict[type[ServiceError], str] = {
    Overloaded: "queue_full",
    GatewayTimeout: "timeout",
    InvalidImage: "bad_image",
    PayloadTooLarge: "too_large",
}


async def _decode(
    uploads: list[tuple[str, bytes]], model: ServedModel, serving: Serving
) -> list[Any]:
    """Decode and transform every upload in the decode pool; the first bad one fails them all."""
    loop = asyncio.get_running_loop()
    max_pixels = serving.settings.max_image_pixels
    decoded = await asyncio.gather(
        *(
            loop.run_in_executor(
                serving.decode_pool, load_image, data, name, max_pixels, model.transform
            )
            for name, data in uploads
        ),
        return_exceptions=True,
    )
    for result in decoded:
        if isinstance(result, ImageTooLarge):
            raise PayloadTooLarge(str(result))
        if isinstance(result, ImageError):
            raise InvalidImage(str(result))
        if isinstance(result, BaseException):
            raise result
    return decoded


async def _predict(
    request: Request,
    model: ServedModel,
    serving: Serving,
    lifecycle: LifecycleDep,
    metrics: MetricsDep,
    top_k: int | None,
) -> PredictResponse:
    info = request_info(request.scope)
    info["model"] = model.name
    if lifecycle.draining:
        raise ServiceUnavailable("the server is shutting down", headers=RETRY_AFTER)
    try:
        return await _answer(request, model, serving, top_k, info)
    except ServiceError as exc:
        reason = _REJECT_REASONS.get(type(exc))
        if reason is not None:
            metrics.reject(model.name, reason, info.get("images") or 1)
        raise


async def _answer(
    request: Request,
    model: ServedModel,
    serving: Serving,
    top_k: int | None,
    info: dict[str, Any],
) -> PredictResponse:
    settings = serving.settings
    loop = asyncio.get_running_loop()
    started = loop.time()
    k = settings.default_top_k if top_k is None else top_k
    labels = model.spec.labels
    if k > len(labels):
        raise InvalidParameter(f"top_k is {k}, the model has only {len(labels)} classes")
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            uploads = await _read_uploads(request, serving)
    except ClientDisconnect:
        raise BadRequest("the client disconnected while sending the body") from None
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {settings.body_timeout_s}s"
        ) from None
    info["images"] = len(uploads)
    if len(uploads) > settings.max_queue_size:
        raise PayloadTooLarge(
            f"{len(uploads)} images, more than the queue can hold ({settings.max_queue_size})"
        )
    # The batch now gathering may wait for these images while they decode.
    arrival = model.batcher.announce(len(uploads))
    try:
        arrays = await _decode(uploads, model, serving)
        remaining = max(settings.request_timeout_s - (loop.time() - started), 0.0)
        payloads = [(array, k) for array in arrays]
        results = await _unless_disconnected(
            request, model.batcher.submit(payloads, remaining, arrival)
        )
    except QueueFull:
        raise Overloaded(
            f"model {model.name!r} is at capacity; retry shortly", headers=RETRY_AFTER
        ) from None
    except BatcherClosed:
        raise ServiceUnavailable("the server is shutting down", headers=RETRY_AFTER) from None
    except TooManyItems as exc:
        raise PayloadTooLarge(str(exc)) from None
    except DeadlineExceeded:
        raise GatewayTimeout(
            f"no prediction within the request timeout ({settings.request_timeout_s}s)"
        ) from None
    except BatchFailed:
        # Logged with its traceback by the batcher; the client gets no internals.
        raise InferenceFailed("the model failed on the batch holding this request") from None
    finally:
        arrival.cancel()
    return PredictResponse(
        model=model.name,
        predictions=[
            ImagePrediction(
                file=name,
                classes=[
                    ClassScore(label=labels[index], index=index, score=score)
                    for score, index in zip(scores, indices, strict=True)
                ],
            )
            for (name, _), (scores, indices) in zip(uploads, results, strict=True)
        ],
    )


@router.post(
    "/models/{name}/predict",
    response_model=PredictResponse,
    responses=_ERRORS,
    openapi_extra=_BODY_DOC,
)
async def predict(
    request: Request,
    model: ModelDep,
    serving: ServingDep,
    lifecycle: LifecycleDep,
    metrics: MetricsDep,
    top_k: TopKQuery = None,
) -> PredictResponse:
    """Classify one or more images with the named model."""
    return await _predict(request, model, serving, lifecycle, metrics, top_k)


@router.post("/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=_BODY_DOC)
async def predict_default(
    request: Request,
    model: DefaultModelDep,
    serving: ServingDep,
    lifecycle: LifecycleDep,
    metrics: MetricsDep,
    top_k: TopKQuery = None,
) -> PredictResponse:
    """Classify one or more images with the default model."""
    return await _predict(request, model, serving, lifecycle, metrics, top_k)
