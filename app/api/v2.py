"""The Open Inference Protocol (KServe v2 / Triton HTTP), beside /v1 and sharing its batchers.

Inputs (exactly one tensor per request, recognised by datatype, whatever its name):
- ``BYTES [N]`` or ``[N, 1]``: encoded images. In JSON, base64 strings; in the binary tensor
  extension, each element is a 4-byte little-endian length and its bytes.
- ``UINT8 [N, H, W, C]``: images already resized and cropped to the model's input size.
- ``FP32 [N, C, H, W]``: tensors the client has also normalised.
Output ``probabilities`` is ``FP32 [N, classes]``; with ``"classification": k`` among its
parameters it becomes ``BYTES [N, k]`` of ``"score:index:label"`` (the classification
extension). Outputs are binary when asked (``binary_data`` per output, or
``binary_data_output``), JSON otherwise. Errors are ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import struct
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app import __version__
from app.api.deps import (
    LifecycleDep,
    MetricsDep,
    ServingDep,
    not_ready_reason,
    require_api_key,
)
from app.api.errors import BadRequest, ModelNotFound, PayloadTooLarge
from app.api.inference import Upload, classify, inference_request, read_all, read_within_limits
from app.serving import ServedModel

OUTPUT = "probabilities"
VERSION = "1"
HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["classification", "binary_tensor_data"]


class ProtocolError(BaseModel):
    error: str = Field(examples=["input 'image': datatype INT32 is not supported"])


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


class Tensor(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None = None


def _model(serving: ServingDep, name: str, version: str | None) -> ServedModel:
    model = serving.models.get(name)
    if model is None:
        raise ModelNotFound(f"model {name!r} is not served (served: {', '.join(serving.models)})")
    if version is not None and version != VERSION:
        raise ModelNotFound(f"model {name!r} has no version {version!r} (only {VERSION!r})")
    return model


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
    return {"name": "evalserve", "version": __version__, "extensions": EXTENSIONS}


def _metadata(model: ServedModel) -> dict[str, Any]:
    channels, height, width = model.spec.input_size
    return {
        "name": model.name,
        "versions": [VERSION],
        "platform": f"evalserve_{model.spec.config.model.source}",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "image_uint8", "datatype": "UINT8", "shape": [-1, height, width, channels]},
            {"name": "input_fp32", "datatype": "FP32", "shape": [-1, channels, height, width]},
        ],
        "outputs": [
            {"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(model.spec.labels)]},
        ],
        "parameters": {
            "inputs": "send exactly one of the inputs; it is recognised by its datatype",
        },
    }


Name = Annotated[str, Path(description="Model name.")]


@router.get("/models/{name}")
async def model_metadata(serving: ServingDep, name: Name) -> dict[str, Any]:
    return _metadata(_model(serving, name, None))


@router.get("/models/{name}/versions/{version}")
async def model_version_metadata(serving: ServingDep, name: Name, version: str) -> dict[str, Any]:
    return _metadata(_model(serving, name, version))


def _model_ready(request: Request, serving: ServingDep, name: str, version: str | None) -> Response:
    _model(serving, name, version)
    reason = not_ready_reason(request)
    if reason is not None:
        return JSONResponse({"error": f"model {name!r} is not ready ({reason})"}, status_code=503)
    return JSONResponse({"name": name, "ready": True})


@router.get("/models/{name}/ready")
async def model_ready(request: Request, serving: ServingDep, name: Name) -> Response:
    return _model_ready(request, serving, name, None)


@router.get("/models/{name}/versions/{version}/ready")
async def model_version_ready(
    request: Request, serving: ServingDep, name: Name, version: str
) -> Response:
    return _model_ready(request, serving, name, version)


# --- infer --------------------------------------------------------------------------------


def _split_body(body: bytes, header_length: str | None) -> tuple[InferenceRequest, bytes]:
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(f"bad Inference-Header-Content-Length {header_length!r}")
        head, binary = body[: int(header_length)], body[int(header_length) :]
    else:
        head, binary = body, b""
    try:
        return InferenceRequest.model_validate_json(head), binary
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "request"
        raise BadRequest(f"invalid inference request: {where}: {first['msg']}") from None


def _binary_elements(raw: bytes) -> list[bytes]:
    """BYTES in the binary tensor extension: 4-byte little-endian length, then the bytes."""
    elements, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise BadRequest("truncated BYTES element length in the binary data")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise BadRequest("a BYTES element is longer than the binary data")
        elements.append(raw[at : at + size])
        at += size
    return elements


def _flat(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    for item in data:
        flat.extend(_flat(item))
    return flat


def _uploads(model: ServedModel, tensor: Tensor, raw: bytes | None) -> list[Upload]:
    """The tensor's images as uploads for the shared inference path."""
    shape, name = tensor.shape, tensor.name
    if not shape or any(dim < 0 for dim in shape) or shape[0] < 1:
        raise BadRequest(f"input {name!r}: shape {shape} must start with a batch size >= 1")
    count = shape[0]
    channels, height, width = model.spec.input_size
    if tensor.datatype == "BYTES":
        if shape not in ([count], [count, 1]):
            raise BadRequest(f"input {name!r}: BYTES images need shape [N] or [N, 1], not {shape}")
        if raw is not None:
            elements = _binary_elements(raw)
        else:
            if tensor.parameters.get("content_type", "base64") != "base64":
                raise BadRequest(f"input {name!r}: JSON BYTES images must be base64")
            try:
                elements = [base64.b64decode(item, validate=True) for item in _flat(tensor.data)]
            except (binascii.Error, TypeError, ValueError):
                raise BadRequest(f"input {name!r}: data is not base64-encoded images") from None
        if len(elements) != count:
            raise BadRequest(f"input {name!r}: shape says {count} images, data has {len(elements)}")
        return [(f"{name}[{i}]", data) for i, data in enumerate(elements)]
    layouts = {
        "UINT8": ([count, height, width, channels], np.uint8, "<u1"),
        "FP32": ([count, channels, height, width], np.float32, "<f4"),
    }
    if tensor.datatype not in layouts:
        raise BadRequest(
            f"input {name!r}: datatype {tensor.datatype} is not supported (BYTES, UINT8, FP32)"
        )
    expected, dtype, wire = layouts[tensor.datatype]
    if shape != expected:
        raise BadRequest(
            f"input {name!r}: {tensor.datatype} shape must be {expected} for model "
            f"{model.name!r}, not {shape}"
        )
    try:
        if raw is not None:
            array = np.frombuffer(raw, dtype=wire).astype(dtype).reshape(expected)
        else:
            array = np.asarray(_flat(tensor.data), dtype=dtype).reshape(expected)
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(
            f"input {name!r}: data does not hold {int(np.prod(expected))} {tensor.datatype} values"
        ) from None
    if tensor.datatype == "FP32" and not np.isfinite(array).all():
        raise BadRequest(f"input {name!r}: FP32 data must be finite")
    return [(f"{name}[{i}]", np.ascontiguousarray(array[i])) for i in range(count)]


def _binary_of(values: np.ndarray | list[bytes]) -> bytes:
    if isinstance(values, np.ndarray):
        return values.astype("<f4").tobytes()
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


@router.post("/models/{name}/infer", responses=_INFER_RESPONSES)
async def infer(
    request: Request,
    serving: ServingDep,
    lifecycle: LifecycleDep,
    metrics: MetricsDep,
    name: Name,
) -> Response:
    return await _infer(request, serving, lifecycle, metrics, name, None)


@router.post("/models/{name}/versions/{version}/infer", responses=_INFER_RESPONSES)
async def infer_version(
    request: Request,
    serving: ServingDep,
    lifecycle: LifecycleDep,
    metrics: MetricsDep,
    name: Name,
    version: str,
) -> Response:
    return await _infer(request, serving, lifecycle, metrics, name, version)


async def _infer(
    request: Request,
    serving: ServingDep,
    lifecycle: LifecycleDep,
    metrics: MetricsDep,
    name: str,
    version: str | None,
) -> Response:
    model = _model(serving, name, version)
    async with inference_request(request, model, lifecycle, metrics) as info:
        started = asyncio.get_running_loop().time()
        body = await read_within_limits(request, serving, read_all)
        inference, binary = _split_body(body, request.headers.get(HEADER_LENGTH))
        if len(inference.inputs) != 1:
            raise BadRequest(f"send exactly one input tensor, not {len(inference.inputs)}")
        tensor = inference.inputs[0]
        size = tensor.parameters.get("binary_data_size")
        if size is not None and (not isinstance(size, int) or size != len(binary)):
            raise BadRequest(f"input {tensor.name!r}: binary_data_size does not match the body")
        raw = binary if size is not None else None
        if raw is None and tensor.data is None:
            raise BadRequest(f"input {tensor.name!r} has neither data nor binary_data_size")
        if tensor.shape and tensor.shape[0] > serving.settings.max_queue_size:
            raise PayloadTooLarge(
                f"{tensor.shape[0]} images, more than the queue can hold "
                f"({serving.settings.max_queue_size})"
            )
        uploads = _uploads(model, tensor, raw)
        info["images"] = len(uploads)
        labels = model.spec.labels
        requested = inference.outputs or [RequestedOutput(name=OUTPUT)]
        for output in requested:
            if output.name != OUTPUT:
                raise BadRequest(f"unknown output {output.name!r} (this model has {OUTPUT!r})")
            k = output.parameters.get("classification")
            if k is not None and (type(k) is not int or not 1 <= k <= len(labels)):
                raise BadRequest(f"classification must be 1 to {len(labels)}, not {k!r}")
        results = await classify(request, model, serving, uploads, len(labels), started)
    probabilities = np.zeros((len(results), len(labels)), dtype=np.float32)
    for row, (scores, indices) in enumerate(results):
        probabilities[row, indices] = scores
    all_binary = bool(inference.parameters.get("binary_data_output", False))
    outputs, blobs = [], []
    for output in requested:
        k = output.parameters.get("classification")
        if k is not None:
            order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
            values: np.ndarray | list[bytes] = [
                f"{probabilities[r, i]:f}:{i}:{labels[i]}".encode()
                for r in range(len(results))
                for i in order[r]
            ]
            entry: dict[str, Any] = {"name": output.name, "datatype": "BYTES"}
            entry["shape"] = [len(results), k]
        else:
            values = probabilities
            entry = {"name": output.name, "datatype": "FP32", "shape": list(probabilities.shape)}
        if output.parameters.get("binary_data", all_binary):
            blob = _binary_of(values)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif isinstance(values, np.ndarray):
            entry["data"] = values.flatten().tolist()
        else:
            entry["data"] = [v.decode() for v in values]
        outputs.append(entry)
    answer: dict[str, Any] = {"model_name": model.name, "model_version": VERSION}
    if inference.id is not None:
        answer["id"] = inference.id
    answer["outputs"] = outputs
    head = json.dumps(answer).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
