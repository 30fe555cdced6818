"""Open Inference Protocol tensors to images, and probabilities to protocol outputs: pure
functions over bytes, JSON values and arrays (no HTTP), unit-tested on their own.

Inputs (exactly one tensor per request, recognised by datatype, whatever its name):
- ``BYTES [N]`` or ``[N, 1]``: encoded images. In JSON, base64 strings; in the binary tensor
  extension, each element is a 4-byte little-endian length and its bytes.
- ``UINT8 [N, H, W, C]``: images already resized and cropped to the model's input size.
- ``FP32 [N, C, H, W]``: tensors the client has also normalised.
Output ``probabilities`` is ``FP32 [N, classes]``; with ``"classification": k`` among its
parameters it becomes ``BYTES [N, k]`` of ``"score:index:label"`` (the classification
extension). Outputs are binary when asked (``binary_data`` per output, or
``binary_data_output``), JSON otherwise. Every refusal is a ``BadRequest`` naming the problem.

Work is bounded by what the request declares, never by what its data claims: element lists are
read only as far as the shape allows, a JSON head within ``MAX_JSON_VALUES`` (413), and an
output may be asked for once, within ``MAX_OUTPUT_VALUES``.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import ValidationError

from app.api.errors import BadRequest, PayloadTooLarge
from app.api.inference import Upload
from app.api.v2.schemas import InferenceRequest, RequestedOutput, Tensor
from app.values import ModelFacts, TopK

OUTPUT = "probabilities"
# Most values one response may hold (images x classes, or x k with classification): 256 images
# of 1000 classes is 256,000. A 128-image request naming its output 80 times made 270 MB.
MAX_OUTPUT_VALUES = 1_000_000
# Up to this many output values a response is built on the event loop (about 2 ms); larger ones
# are built in the decode pool, so they stall no other request.
INLINE_OUTPUT_VALUES = 8192
# Most values a JSON request head may hold (counted by its commas, before parsing). Parsing holds
# the GIL, so even in a thread it stalls the event loop: about 70 ns a value, 0.15 s for these
# two million (13 UINT8 images of 224x224x3), where a 20 MB body of them stalled it for 1 s.
# Larger tensors go in binary (the binary tensor extension), which costs no parsing.
MAX_JSON_VALUES = 2_000_000
EXTENSIONS = ("classification", "binary_tensor_data", "model_repository")


def server_metadata(version: str) -> dict[str, Any]:
    """What the server says about itself (REST ``GET /v2``, gRPC ServerMetadata)."""
    return {"name": "evalserve", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(facts: ModelFacts) -> dict[str, Any]:
    """A model's inputs and outputs (REST ``GET /v2/models/{name}``, gRPC ModelMetadata)."""
    channels, height, width = facts.input_size
    return {
        "name": facts.name,
        "versions": [facts.version],
        "platform": f"evalserve_{facts.source}",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "image_uint8", "datatype": "UINT8", "shape": [-1, height, width, channels]},
            {"name": "input_fp32", "datatype": "FP32", "shape": [-1, channels, height, width]},
        ],
        "outputs": [
            {"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(facts.labels)]},
        ],
        "parameters": {
            "inputs": "send exactly one of the inputs; it is recognised by its datatype",
        },
    }


def split_body(body: bytes, header_length: str | None) -> tuple[InferenceRequest, bytes]:
    """The JSON inference request and the binary data after it (binary tensor extension)."""
    if header_length is not None:
        # isdigit() alone accepts "²", which int() does not.
        digits = header_length.isascii() and header_length.isdigit()
        if not digits or int(header_length) > len(body):
            raise BadRequest(f"bad Inference-Header-Content-Length {header_length!r}")
        head, binary = body[: int(header_length)], body[int(header_length) :]
    else:
        head, binary = body, b""
    if head.count(b",") >= MAX_JSON_VALUES:
        raise PayloadTooLarge(
            f"the JSON request holds more than {MAX_JSON_VALUES} values: send large tensors "
            "in binary (the binary tensor extension)"
        )
    try:
        return InferenceRequest.model_validate_json(head), binary
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "request"
        raise BadRequest(f"invalid inference request: {where}: {first['msg']}") from None


def the_input(request: InferenceRequest, binary: bytes) -> tuple[Tensor, bytes | None]:
    """The request's one input tensor, and its binary data (None when its data is JSON)."""
    if len(request.inputs) != 1:
        raise BadRequest(f"send exactly one input tensor, not {len(request.inputs)}")
    tensor = request.inputs[0]
    size = tensor.parameters.get("binary_data_size")
    if size is not None and (not isinstance(size, int) or size != len(binary)):
        raise BadRequest(f"input {tensor.name!r}: binary_data_size does not match the body")
    raw = binary if size is not None else None
    if raw is None and tensor.data is None:
        raise BadRequest(f"input {tensor.name!r} has neither data nor binary_data_size")
    return tensor, raw


def image_count(tensor: Tensor) -> int:
    """How many images the tensor's shape declares (its first dimension)."""
    shape = tensor.shape
    if not shape or any(dim < 0 for dim in shape) or shape[0] < 1:
        raise BadRequest(f"input {tensor.name!r}: shape {shape} must start with a batch size >= 1")
    return shape[0]


def binary_elements(raw: bytes, most: int | None = None) -> list[bytes]:
    """BYTES in the binary tensor extension: 4-byte little-endian length, then the bytes.
    Stops with a refusal past ``most`` elements (20 MB of empty elements are 5 million)."""
    elements: list[bytes] = []
    at = 0
    while at < len(raw):
        if most is not None and len(elements) == most:
            raise BadRequest(f"the binary data holds more than {most} BYTES elements")
        if at + 4 > len(raw):
            raise BadRequest("truncated BYTES element length in the binary data")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise BadRequest("a BYTES element is longer than the binary data")
        elements.append(raw[at : at + size])
        at += size
    return elements


def _leaves(data: Any, dtype: Any) -> np.ndarray:
    """The values of (nested) JSON lists as one flat array, read by numpy in C (a Python loop
    over a 15 MB array took 3 s). Raises ValueError, TypeError or OverflowError when they are
    ragged or do not fit ``dtype``."""
    return np.asarray(data, dtype=dtype).reshape(-1)


def decode_images(
    tensor: Tensor, raw: bytes | None, input_size: tuple[int, int, int]
) -> list[Upload]:
    """The tensor's images as uploads for the shared inference path: encoded bytes for BYTES,
    arrays ready for the batch for UINT8 and FP32 (checked against the model's ``input_size``,
    channels first)."""
    shape, name = tensor.shape, tensor.name
    count = image_count(tensor)
    channels, height, width = input_size
    if tensor.datatype == "BYTES":
        if shape not in ([count], [count, 1]):
            raise BadRequest(f"input {name!r}: BYTES images need shape [N] or [N, 1], not {shape}")
        if raw is not None:
            elements = binary_elements(raw, count)
        else:
            if tensor.parameters.get("content_type", "base64") != "base64":
                raise BadRequest(f"input {name!r}: JSON BYTES images must be base64")
            try:
                items = _leaves(tensor.data, object)
                if len(items) != count:
                    raise BadRequest(
                        f"input {name!r}: shape says {count} images, data has {len(items)}"
                    )
                elements = [base64.b64decode(item, validate=True) for item in items]
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
            f"input {name!r}: {tensor.datatype} shape must be {expected} for this model, "
            f"not {shape}"
        )
    try:
        if raw is not None:
            array = np.frombuffer(raw, dtype=wire).astype(dtype).reshape(expected)
        else:
            array = _leaves(tensor.data, dtype).reshape(expected)
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(
            f"input {name!r}: data does not hold {int(np.prod(expected))} {tensor.datatype} values"
        ) from None
    if tensor.datatype == "FP32" and not np.isfinite(array).all():
        raise BadRequest(f"input {name!r}: FP32 data must be finite")
    return [(f"{name}[{i}]", np.ascontiguousarray(array[i])) for i in range(count)]


def requested_outputs(request: InferenceRequest, classes: int) -> list[RequestedOutput]:
    """The outputs asked for (``probabilities`` when none is named), checked: each known, each
    asked for once, and the response within ``MAX_OUTPUT_VALUES`` for the request's images."""
    requested = request.outputs or [RequestedOutput(name=OUTPUT)]
    seen: set[str] = set()
    for output in requested:
        if output.name != OUTPUT:
            raise BadRequest(f"unknown output {output.name!r} (this model has {OUTPUT!r})")
        if output.name in seen:
            raise BadRequest(f"output {output.name!r} is requested more than once")
        seen.add(output.name)
        k = output.parameters.get("classification")
        if k is not None and (type(k) is not int or not 1 <= k <= classes):
            raise BadRequest(f"classification must be 1 to {classes}, not {k!r}")
        images = image_count(request.inputs[0]) if len(request.inputs) == 1 else 1
        values = images * (classes if k is None else k)
        if values > MAX_OUTPUT_VALUES:
            raise BadRequest(
                f"output {output.name!r} would hold {values} values ({images} images), the "
                f"limit is {MAX_OUTPUT_VALUES}: ask for fewer classes or send fewer images"
            )
    return requested


def probabilities(results: Sequence[TopK], classes: int) -> np.ndarray:
    """``[N, classes]`` float32 from each image's top-k (all classes, when k is ``classes``)."""
    table = np.zeros((len(results), classes), dtype=np.float32)
    for row, (scores, indices) in enumerate(results):
        table[row, indices] = scores
    return table


def binary_of(values: np.ndarray | list[bytes]) -> bytes:
    """An output's raw bytes: little-endian FP32, or length-prefixed BYTES elements."""
    if isinstance(values, np.ndarray):
        return values.astype("<f4").tobytes()
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def render_output(
    table: np.ndarray, labels: Sequence[str], output: RequestedOutput
) -> tuple[str, list[int], np.ndarray | list[bytes]]:
    """One requested output's datatype, shape and values: the probability table as FP32, or
    with the ``classification`` parameter the top-k as ``"score:index:label"`` BYTES."""
    k = output.parameters.get("classification")
    if k is None:
        return "FP32", list(table.shape), table
    order = np.argsort(-table, axis=1, kind="stable")[:, :k]
    values = [
        f"{table[r, i]:f}:{i}:{labels[i]}".encode() for r in range(len(table)) for i in order[r]
    ]
    return "BYTES", [len(table), k], values


def encode_response(
    answer: dict[str, Any],
    table: np.ndarray,
    labels: Sequence[str],
    requested: Sequence[RequestedOutput],
    all_binary: bool,
) -> tuple[bytes, bytes]:
    """The response's JSON head (``answer`` plus its ``outputs``) and the binary data after it
    (empty when every output is JSON)."""
    outputs, blobs = [], []
    for output in requested:
        datatype, shape, values = render_output(table, labels, output)
        entry: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": shape}
        if output.parameters.get("binary_data", all_binary):
            blob = binary_of(values)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif isinstance(values, np.ndarray):
            entry["data"] = values.flatten().tolist()
        else:
            entry["data"] = [v.decode() for v in values]
        outputs.append(entry)
    return json.dumps({**answer, "outputs": outputs}).encode(), b"".join(blobs)
