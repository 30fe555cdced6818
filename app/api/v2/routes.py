"""The Open Inference Protocol's routes: health, metadata, readiness and infer. Thin: the codec
turns tensors into images and probabilities into outputs, ``Inference`` does the rest, as for
/v1."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, Response

from app import __version__
from app.api.deps import ServingDep, find_model, not_ready_reason, require_api_key
from app.api.inference import Inference, Upload, read_all
from app.api.v2 import codec
from app.api.v2.schemas import InferenceRequest, ProtocolError, RequestedOutput, Tensor
from app.state import ServedModel
from app.values import ModelFacts

HEADER_LENGTH = "inference-header-content-length"
T = TypeVar("T")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ProtocolError} for code in codes}


open_router = APIRouter(prefix="/v2", tags=["v2"], responses=_errors(503))
router = APIRouter(
    prefix="/v2",
    tags=["v2"],
    dependencies=[Depends(require_api_key)],
    responses=_errors(400, 401, 403, 404, 503),
)
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON, or with binary outputs the JSON header followed by their bytes.",
        "content": {
            "application/json": {},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    **_errors(408, 413, 500, 504),
}

Name = Annotated[str, Path(description="Model name.")]
Version = Annotated[str, Path(description="Model version (model.toml's model.version).")]


async def any_version(serving: ServingDep, name: Name) -> ServedModel:
    return find_model(serving, name)


async def at_version(serving: ServingDep, name: Name, version: Version) -> ServedModel:
    return find_model(serving, name, version)


async def _inference_any(
    request: Request, model: Annotated[ServedModel, Depends(any_version)]
) -> AsyncIterator[Inference]:
    async with Inference.open(request, model) as inference:
        yield inference


async def _inference_at(
    request: Request, model: Annotated[ServedModel, Depends(at_version)]
) -> AsyncIterator[Inference]:
    async with Inference.open(request, model) as inference:
        yield inference


AnyVersion = Annotated[ServedModel, Depends(any_version)]
AtVersion = Annotated[ServedModel, Depends(at_version)]


# --- health and metadata ------------------------------------------------------------------


@open_router.get("/health/live")
async def live() -> dict[str, bool]:
    """200 while the process runs."""
    return {"live": True}


@open_router.get("/health/ready", response_model=None)
async def ready(request: Request) -> dict[str, bool] | JSONResponse:
    """200 when every model is loaded and warm and the server is not draining; 503 otherwise."""
    reason = not_ready_reason(request)
    if reason is not None:
        return JSONResponse({"error": f"the server is not ready ({reason})"}, status_code=503)
    return {"ready": True}


@open_router.get("")
async def server_metadata() -> dict[str, Any]:
    return codec.server_metadata(__version__)


@router.get("/models/{name}")
async def model_metadata(model: AnyVersion) -> dict[str, Any]:
    return codec.model_metadata(model.describe())


@router.get("/models/{name}/versions/{version}")
async def model_version_metadata(model: AtVersion) -> dict[str, Any]:
    return codec.model_metadata(model.describe())


def _model_ready(request: Request, model: ServedModel) -> Response:
    reason = not_ready_reason(request)
    if reason is not None:
        return JSONResponse(
            {"error": f"model {model.name!r} is not ready ({reason})"}, status_code=503
        )
    return JSONResponse({"name": model.name, "ready": True})


@router.get("/models/{name}/ready")
async def model_ready(request: Request, model: AnyVersion) -> Response:
    return _model_ready(request, model)


@router.get("/models/{name}/versions/{version}/ready")
async def model_version_ready(request: Request, model: AtVersion) -> Response:
    return _model_ready(request, model)


# --- infer --------------------------------------------------------------------------------


@router.post("/models/{name}/infer", responses=_INFER_RESPONSES)
async def infer(call: Annotated[Inference, Depends(_inference_any)]) -> Response:
    return await _infer(call)


@router.post("/models/{name}/versions/{version}/infer", responses=_INFER_RESPONSES)
async def infer_version(call: Annotated[Inference, Depends(_inference_at)]) -> Response:
    return await _infer(call)


async def _infer(call: Inference) -> Response:
    body = await call.read_body(read_all)
    large = len(body) > INLINE_BYTES
    inference, tensor, raw = await _offload_if(
        call, large, _parse, body, call.headers.get(HEADER_LENGTH)
    )
    call.expect(codec.image_count(tensor))  # before decoding anything
    facts = call.model.describe()
    uploads, requested = await _offload_if(call, large, _unpack, inference, tensor, raw, facts)
    results = await call.classify(uploads, len(facts.labels))
    answer: dict[str, Any] = {"model_name": facts.name, "model_version": facts.version}
    if inference.id is not None:
        answer["id"] = inference.id
    values = len(results) * len(facts.labels)
    head, blobs = await _offload_if(
        call,
        values > codec.INLINE_OUTPUT_VALUES,
        codec.encode_response,
        answer,
        codec.probabilities(results, len(facts.labels)),
        facts.labels,
        requested,
        bool(inference.parameters.get("binary_data_output", False)),
    )
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        head + blobs,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


# Up to this many bytes of body, parsing takes well under a millisecond and is done on the event
# loop; larger bodies are parsed in the decode pool (a 15 MB JSON array took about a second,
# during which no other request was answered).
INLINE_BYTES = 64 * 1024


async def _offload_if(call: Inference, large: bool, function: Callable[..., T], *args: Any) -> T:
    if large:
        return await call.offload(function, *args)
    return function(*args)


def _parse(body: bytes, header_length: str | None) -> tuple[InferenceRequest, Tensor, bytes | None]:
    inference, binary = codec.split_body(body, header_length)
    tensor, raw = codec.the_input(inference, binary)
    return inference, tensor, raw


def _unpack(
    inference: InferenceRequest, tensor: Tensor, raw: bytes | None, facts: ModelFacts
) -> tuple[list[Upload], list[RequestedOutput]]:
    requested = codec.requested_outputs(inference, len(facts.labels))
    return codec.decode_images(tensor, raw, facts.input_size), requested
