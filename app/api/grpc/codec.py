"""gRPC messages to and from the values REST ``/v2`` already understands: pure functions, so
both protocols share one codec (``app.api.v2.codec``) and accept the same inputs.

A ``ModelInferRequest`` becomes the REST ``InferenceRequest`` plus its one input tensor and that
tensor's raw bytes: ``raw_input_contents`` as sent (BYTES length-prefixed, UINT8, little-endian
FP32, as in the binary tensor extension), or the typed ``contents`` packed into the same raw
form. Outputs come back in ``raw_output_contents``, as Triton answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from app.api.errors import BadRequest
from app.api.grpc import messages
from app.api.v2 import codec
from app.api.v2.schemas import InferenceRequest, RequestedOutput, Tensor
from app.values import TopK


def parameter_value(parameter: Any) -> Any:
    """The Python value of an ``InferParameter`` (bool, int or str; None when unset)."""
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice is not None else None


def _parameters(mapping: Any) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in mapping.items()}


def _packed_contents(tensor: Any) -> bytes:
    """A tensor's typed ``contents`` as the raw bytes of its datatype (empty when the datatype
    is one evalserve refuses anyway: ``codec.decode_images`` names it)."""
    contents = tensor.contents
    if tensor.datatype == "BYTES":
        return codec.binary_of(list(contents.bytes_contents))
    if tensor.datatype == "UINT8":
        values = np.asarray(contents.uint_contents, dtype=np.uint32)
        if values.size and int(values.max()) > 255:
            raise BadRequest(f"input {tensor.name!r}: UINT8 contents must be 0 to 255")
        return values.astype(np.uint8).tobytes()
    if tensor.datatype == "FP32":
        return np.asarray(contents.fp32_contents, dtype="<f4").tobytes()
    return b""


def infer_request(message: Any) -> tuple[InferenceRequest, Tensor, bytes]:
    """The request, its one input tensor and that tensor's raw bytes."""
    if len(message.inputs) != 1:
        raise BadRequest(f"send exactly one input tensor, not {len(message.inputs)}")
    raw_contents = list(message.raw_input_contents)
    if len(raw_contents) > 1:
        raise BadRequest(f"raw_input_contents has {len(raw_contents)} entries for one input")
    sent = message.inputs[0]
    tensor = Tensor(
        name=sent.name,
        shape=list(sent.shape),
        datatype=sent.datatype,
        parameters=_parameters(sent.parameters),
    )
    request = InferenceRequest(
        id=message.id or None,
        parameters=_parameters(message.parameters),
        inputs=[tensor],
        outputs=[
            RequestedOutput(name=output.name, parameters=_parameters(output.parameters))
            for output in message.outputs
        ]
        or None,
    )
    raw = raw_contents[0] if raw_contents else _packed_contents(sent)
    return request, tensor, raw


def infer_response(
    answer: dict[str, str],
    results: Sequence[TopK],
    labels: Sequence[str],
    requested: Sequence[RequestedOutput],
) -> Any:
    """A ``ModelInferResponse`` with each requested output in ``raw_output_contents``."""
    response = messages.ModelInferResponse(**answer)
    table = codec.probabilities(results, len(labels))
    for output in requested:
        datatype, shape, values = codec.render_output(table, labels, output)
        response.outputs.add(name=output.name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(codec.binary_of(values))
    return response


def model_metadata(metadata: dict[str, Any]) -> Any:
    """A ``ModelMetadataResponse`` from the REST metadata (its free-form parameters have no
    place in the message)."""
    return messages.ModelMetadataResponse(
        name=metadata["name"],
        versions=metadata["versions"],
        platform=metadata["platform"],
        inputs=metadata["inputs"],
        outputs=metadata["outputs"],
    )
