"""The gRPC side without a server: the shipped descriptor set is the .protos compiled, messages
round-trip with tritonclient's own generated ones (wire compatibility), typed contents become
the raw bytes the REST codec reads, and every ServiceError has a deliberate gRPC code."""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

import app.api.errors as errors
from app.api.errors import BadRequest, ServiceError
from app.api.grpc import codec, messages
from app.api.grpc.service import status_of

ROOT = Path(__file__).resolve().parents[2]


def load_script() -> object:
    spec = importlib.util.spec_from_file_location(
        "compile_protos", ROOT / "scripts" / "compile_protos.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["compile_protos"] = module
    spec.loader.exec_module(module)
    return module


def test_the_shipped_descriptor_set_is_the_protos_compiled(tmp_path: Path) -> None:
    script = load_script()
    assert script.main(["--check"]) == 0  # type: ignore[attr-defined]
    # And the check can fail: a descriptor set missing one message is stale.
    fresh = script.compile_protos()  # type: ignore[attr-defined]
    del fresh.file[0].message_type[-1]
    stale = tmp_path / "inference.binpb"
    stale.write_bytes(fresh.SerializeToString())
    script.OUTPUT = stale  # type: ignore[attr-defined]
    assert script.main(["--check"]) == 1  # type: ignore[attr-defined]


def test_messages_are_wire_compatible_with_tritonclient() -> None:
    theirs = service_pb2.ModelInferRequest(model_name="m", model_version="2", id="x")
    tensor = theirs.inputs.add(name="image", datatype="BYTES", shape=[2])
    tensor.parameters["p"].int64_param = 7
    theirs.outputs.add(name="probabilities").parameters["classification"].int64_param = 3
    theirs.raw_input_contents.append(b"\x01\x00\x00\x00z")
    ours = messages.ModelInferRequest.FromString(theirs.SerializeToString())
    request, parsed, raw = codec.infer_request(ours)
    assert (request.id, parsed.name, parsed.datatype, parsed.shape) == ("x", "image", "BYTES", [2])
    assert parsed.parameters == {"p": 7}
    assert request.outputs is not None
    assert request.outputs[0].parameters == {"classification": 3}
    assert raw == b"\x01\x00\x00\x00z"
    index = messages.RepositoryIndexResponse()
    index.models.add(name="digits", version="1", state="READY", reason="")
    back = service_pb2.RepositoryIndexResponse.FromString(index.SerializeToString())
    assert (back.models[0].name, back.models[0].state) == ("digits", "READY")


def typed(datatype: str, shape: list[int], **contents: object) -> object:
    message = messages.ModelInferRequest(model_name="m")
    message.inputs.add(
        name="x", datatype=datatype, shape=shape, contents=messages.InferTensorContents(**contents)
    )
    return message


def test_typed_contents_become_the_raw_bytes_of_their_datatype() -> None:
    _, _, raw = codec.infer_request(typed("BYTES", [2], bytes_contents=[b"ab", b"c"]))
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 1) + b"c"
    _, _, raw = codec.infer_request(typed("UINT8", [3], uint_contents=[0, 7, 255]))
    assert raw == bytes([0, 7, 255])
    _, _, raw = codec.infer_request(typed("FP32", [2], fp32_contents=[0.5, -1.0]))
    assert np.frombuffer(raw, dtype="<f4").tolist() == [0.5, -1.0]
    with pytest.raises(BadRequest, match="0 to 255"):
        codec.infer_request(typed("UINT8", [1], uint_contents=[256]))


def test_one_input_and_one_raw_content_at_most() -> None:
    message = messages.ModelInferRequest(model_name="m")
    with pytest.raises(BadRequest, match="exactly one input"):
        codec.infer_request(message)
    message.inputs.add(name="a", datatype="BYTES", shape=[1])
    message.raw_input_contents.extend([b"", b""])
    with pytest.raises(BadRequest, match="raw_input_contents has 2"):
        codec.infer_request(message)


def test_outputs_go_back_raw_as_triton_answers() -> None:
    from app.api.v2.schemas import RequestedOutput
    from app.values import TopK

    results = [TopK([0.75, 0.25], [1, 0])]
    response = codec.infer_response(
        {"model_name": "m", "model_version": "1"},
        results,
        ["zero", "one"],
        [
            RequestedOutput(name="probabilities"),
            RequestedOutput(name="probabilities", parameters={"classification": 1}),
        ],
    )
    theirs = service_pb2.ModelInferResponse.FromString(response.SerializeToString())
    assert [o.datatype for o in theirs.outputs] == ["FP32", "BYTES"]
    assert np.frombuffer(theirs.raw_output_contents[0], dtype="<f4").tolist() == [0.25, 0.75]
    label = b"0.750000:1:one"
    assert theirs.raw_output_contents[1] == struct.pack("<I", len(label)) + label


def every_service_error() -> list[type[ServiceError]]:
    return [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, ServiceError) and value is not ServiceError
    ]


@pytest.mark.parametrize("error", every_service_error(), ids=lambda e: e.__name__)
def test_every_service_error_has_a_deliberate_grpc_code(error: type[ServiceError]) -> None:
    code = status_of(error("x"))
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.OK)
    if error.status_code >= 500:
        assert code in (
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.UNIMPLEMENTED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
