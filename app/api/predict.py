"""POST /v1 predict: multipart files or one raw image in, top-k classes per image out."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.api.deps import DefaultInferenceDep, InferenceDep, require_api_key
from app.api.errors import (
    BadRequest,
    InvalidParameter,
    UnsupportedMediaType,
)
from app.api.inference import Inference, Upload, read_all
from app.api.schemas import (
    AUTH_RESPONSES,
    ClassScore,
    ErrorResponse,
    ImagePrediction,
    PredictResponse,
)

router = APIRouter(prefix="/v1", tags=["predict"], dependencies=[Depends(require_api_key)])

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
        # Accepted whatever this Pillow decodes: one that cannot is a 400 naming what it can.
        "image/avif",
        "image/heic",
        "image/heif",
        "application/octet-stream",
    }
)

_ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    400: {"model": ErrorResponse, "description": "An upload is not a readable image."},
    408: {"model": ErrorResponse, "description": "The body took too long to arrive."},
    404: {"model": ErrorResponse, "description": "No such model."},
    413: {
        "model": ErrorResponse,
        "description": "Body, an image's pixels, all images' pixels or their count over the limit.",
    },
    415: {"model": ErrorResponse, "description": "Content-Type is not multipart or an image."},
    422: {"model": ErrorResponse, "description": "Bad query parameter."},
    500: {"model": ErrorResponse, "description": "The forward pass failed on this batch."},
    503: {"model": ErrorResponse, "description": "Queue full or shutting down; see Retry-After."},
    504: {"model": ErrorResponse, "description": "No result within the request timeout."},
    507: {"model": ErrorResponse, "description": "Out of device memory, even in half a batch."},
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


async def _read_uploads(call: Inference, stream: AsyncGenerator[bytes, None]) -> list[Upload]:
    """(name, bytes) of every image in the request body (multipart or one raw image)."""
    headers = call.headers
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type in RAW_IMAGE_TYPES:
        return [("body", await read_all(stream))]
    if media_type != "multipart/form-data":
        raise UnsupportedMediaType(
            f"Content-Type {media_type or '(none)'!r} is not accepted; send multipart/form-data "
            f"with '{FILE_FIELD}' parts, or a raw image (image/jpeg, image/png, ...)"
        )
    # The parser stops at one file more than the queue holds; call.expect then refuses them.
    max_files = call.model.batcher.max_queue_size + 1
    parser = MultiPartParser(headers, stream, max_files=max_files)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            call.expect(max_files)
        raise BadRequest(f"malformed multipart body: {exc.message}") from exc
    try:
        uploads: list[Upload] = []
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


async def _predict(call: Inference, top_k: int | None) -> PredictResponse:
    k = call.settings.default_top_k if top_k is None else top_k
    labels = call.model.labels
    if k > len(labels):
        raise InvalidParameter(f"top_k is {k}, the model has only {len(labels)} classes")
    uploads = await call.read_body(lambda stream: _read_uploads(call, stream))
    results = await call.classify(uploads, k)
    return PredictResponse(
        model=call.model.name,
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
async def predict(call: InferenceDep, top_k: TopKQuery = None) -> PredictResponse:
    """Classify one or more images with the named model."""
    return await _predict(call, top_k)


@router.post("/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=_BODY_DOC)
async def predict_default(call: DefaultInferenceDep, top_k: TopKQuery = None) -> PredictResponse:
    """Classify one or more images with the default model."""
    return await _predict(call, top_k)
