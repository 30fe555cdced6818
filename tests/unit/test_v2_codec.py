"""The Open Inference Protocol codec on its own (no HTTP, no model): tensors in, images out;
probabilities in, protocol outputs out."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import numpy as np
import pytest

from app.api.errors import BadRequest, PayloadTooLarge
from app.api.v2 import codec
from app.api.v2.schemas import InferenceRequest, RequestedOutput, Tensor
from app.values import TopK

INPUT_SIZE = (3, 4, 5)  # channels, height, width


def tensor(datatype: str, shape: list[int], data: object = None, **parameters: object) -> Tensor:
    return Tensor(name="x", shape=shape, datatype=datatype, data=data, parameters=parameters)


def binary(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def test_binary_bytes_elements_are_split_by_their_length_prefixes() -> None:
    assert codec.binary_elements(binary(b"abc", b"", b"de")) == [b"abc", b"", b"de"]


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\x03\x00", "truncated BYTES element length"),
        (struct.pack("<I", 9) + b"short", "longer than the binary data"),
    ],
)
def test_malformed_binary_bytes_are_refused(raw: bytes, problem: str) -> None:
    with pytest.raises(BadRequest, match=problem):
        codec.binary_elements(raw)


def test_json_bytes_images_are_base64_decoded_and_named_by_position() -> None:
    images = [b"\xff\xd8one", b"\xff\xd8two"]
    data = [base64.b64encode(i).decode() for i in images]
    uploads = codec.decode_images(tensor("BYTES", [2, 1], data), None, INPUT_SIZE)
    assert uploads == [("x[0]", images[0]), ("x[1]", images[1])]


def test_binary_bytes_images_come_from_the_raw_data() -> None:
    uploads = codec.decode_images(tensor("BYTES", [2]), binary(b"a", b"bc"), INPUT_SIZE)
    assert uploads == [("x[0]", b"a"), ("x[1]", b"bc")]


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (tensor("BYTES", [2], ["aGk="]), "shape says 2 images, data has 1"),
        (tensor("BYTES", [1], ["not base64!"]), "not base64-encoded"),
        (tensor("BYTES", [1, 2], ["aGk=", "aGk="]), r"need shape \[N\] or \[N, 1\]"),
        (tensor("INT32", [1, 1], [1]), "datatype INT32 is not supported"),
        (tensor("UINT8", [1, 5, 4, 3], [0] * 60), r"shape must be \[1, 4, 5, 3\]"),
        (tensor("FP32", [1, 3, 4, 5], [0.0] * 59), "does not hold 60 FP32 values"),
        (tensor("FP32", [1, 3, 4, 5], [float("nan")] * 60), "must be finite"),
        (tensor("UINT8", [0, 4, 5, 3], []), "batch size >= 1"),
    ],
)
def test_tensors_that_do_not_fit_are_refused_naming_the_problem(bad: Tensor, problem: str) -> None:
    with pytest.raises(BadRequest, match=problem):
        codec.decode_images(bad, None, INPUT_SIZE)


def test_uint8_and_fp32_tensors_become_per_image_arrays_in_model_layout() -> None:
    pixels = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    uploads = codec.decode_images(tensor("UINT8", [2, 4, 5, 3]), pixels.tobytes(), INPUT_SIZE)
    assert [name for name, _ in uploads] == ["x[0]", "x[1]"]
    assert all(isinstance(a, np.ndarray) and a.dtype == np.uint8 for _, a in uploads)
    assert np.array_equal(uploads[1][1], pixels[1])
    values = np.linspace(-1, 1, 60, dtype=np.float32).reshape(1, 3, 4, 5)
    [(_, array)] = codec.decode_images(
        tensor("FP32", [1, 3, 4, 5], values.tolist()), None, INPUT_SIZE
    )
    assert isinstance(array, np.ndarray)
    assert array.dtype == np.float32
    assert np.array_equal(array, values[0])


def test_the_request_body_splits_at_the_header_length() -> None:
    head = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES"}]}).encode()
    request, rest = codec.split_body(head + b"BINARY", str(len(head)))
    assert request.inputs[0].name == "x"
    assert rest == b"BINARY"
    with pytest.raises(BadRequest, match="bad Inference-Header-Content-Length"):
        codec.split_body(head, str(len(head) + 1))
    with pytest.raises(BadRequest, match="invalid inference request: inputs"):
        codec.split_body(b'{"inputs": 3}', None)


def test_exactly_one_input_with_data_is_taken() -> None:
    two = InferenceRequest(inputs=[tensor("BYTES", [1], ["aGk="])] * 2)
    with pytest.raises(BadRequest, match="exactly one input tensor, not 2"):
        codec.the_input(two, b"")
    sized = InferenceRequest(inputs=[tensor("BYTES", [1], binary_data_size=3)])
    with pytest.raises(BadRequest, match="binary_data_size does not match"):
        codec.the_input(sized, b"ab")
    assert codec.the_input(sized, b"abc")[1] == b"abc"
    empty = InferenceRequest(inputs=[tensor("BYTES", [1])])
    with pytest.raises(BadRequest, match="neither data nor binary_data_size"):
        codec.the_input(empty, b"")


def test_probabilities_put_each_top_k_score_at_its_class_index() -> None:
    table = codec.probabilities([TopK([0.7, 0.2], [2, 0]), TopK([0.9], [1])], classes=3)
    assert table.dtype == np.float32
    assert np.allclose(table, [[0.2, 0.0, 0.7], [0.0, 0.9, 0.0]])


def test_classification_outputs_are_score_index_label_strings_best_first() -> None:
    table = np.array([[0.1, 0.6, 0.3]], dtype=np.float32)
    requested = [RequestedOutput(name="probabilities", parameters={"classification": 2})]
    head, blobs = codec.encode_response({"id": "7"}, table, ["a", "b", "c"], requested, False)
    answer = json.loads(head)
    assert answer["id"] == "7"
    assert blobs == b""
    [output] = answer["outputs"]
    assert output["datatype"] == "BYTES"
    assert output["shape"] == [1, 2]
    assert output["data"] == ["0.600000:1:b", "0.300000:2:c"]


def test_binary_outputs_carry_their_size_and_little_endian_floats() -> None:
    table = np.array([[0.25, 0.75]], dtype=np.float32)
    requested = [RequestedOutput(name="probabilities")]
    head, blobs = codec.encode_response({}, table, ["a", "b"], requested, True)
    [output] = json.loads(head)["outputs"]
    assert output["parameters"] == {"binary_data_size": 8}
    assert np.array_equal(np.frombuffer(blobs, "<f4"), [0.25, 0.75])


@pytest.mark.parametrize(
    ("outputs", "problem"),
    [
        ([{"name": "logits"}], "unknown output 'logits'"),
        ([{"name": "probabilities", "parameters": {"classification": 0}}], "1 to 3, not 0"),
        ([{"name": "probabilities", "parameters": {"classification": True}}], "not True"),
    ],
)
def test_unknown_outputs_and_bad_classification_counts_are_refused(
    outputs: list[dict[str, object]], problem: str
) -> None:
    request = InferenceRequest.model_validate({"inputs": [], "outputs": outputs})
    with pytest.raises(BadRequest, match=problem):
        codec.requested_outputs(request, classes=3)


# --- issue 15, item 6: work bounded by what the request declares ------------------------------


@pytest.mark.parametrize("length", ["²", "-5", "1e3", " 12", "١٢"])
def test_a_header_length_that_is_not_ascii_digits_is_a_bad_request(length: str) -> None:
    # "²".isdigit() and "١٢".isdigit() are true, and int("²") raises: a 500 before.
    with pytest.raises(BadRequest, match="bad Inference-Header-Content-Length"):
        codec.split_body(b'{"inputs": []}' + b"x" * 2000, length)


def test_binary_bytes_elements_past_the_shape_are_refused_without_reading_them_all() -> None:
    raw = b"\x00\x00\x00\x00" * 1_000_000  # a million empty elements, for shape [2]
    with pytest.raises(BadRequest, match="more than 2 BYTES elements"):
        codec.decode_images(tensor("BYTES", [2], binary_data_size=len(raw)), raw, INPUT_SIZE)
    assert codec.binary_elements(binary(b"a", b"b"), 2) == [b"a", b"b"]


def test_json_values_are_read_by_numpy_nested_or_flat() -> None:
    nested = np.arange(60).reshape(1, 4, 5, 3).tolist()
    [(_, array)] = codec.decode_images(tensor("UINT8", [1, 4, 5, 3], nested), None, INPUT_SIZE)
    assert isinstance(array, np.ndarray)
    assert array.reshape(-1).tolist() == list(range(60))
    with pytest.raises(BadRequest, match="does not hold 60 UINT8 values"):
        codec.decode_images(tensor("UINT8", [1, 4, 5, 3], [[0] * 30, [0] * 29]), None, INPUT_SIZE)
    with pytest.raises(BadRequest, match="shape says 1 images, data has 2"):
        codec.decode_images(tensor("BYTES", [1], [["aGk="], ["aGk="]]), None, INPUT_SIZE)


def test_a_json_head_of_too_many_values_is_refused_before_parsing() -> None:
    head = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [0'
    many = head + b",0" * codec.MAX_JSON_VALUES + b"]}]}"
    with pytest.raises(PayloadTooLarge, match="binary tensor extension"):
        codec.split_body(many, None)
    fewer = head + b",0" * (codec.MAX_JSON_VALUES - 100) + b"]}]}"
    assert codec.split_body(fewer, None)[0].inputs[0].name == "x"


def request_for(images: int, *outputs: Any) -> InferenceRequest:
    return InferenceRequest.model_validate(
        {
            "inputs": [{"name": "x", "shape": [images], "datatype": "BYTES"}],
            "outputs": list(outputs),
        }
    )


def test_an_output_asked_for_twice_is_refused() -> None:
    # 128 images x 80 copies of classification 1000 made a 270 MB response in 27.8 s.
    output = {"name": "probabilities", "parameters": {"classification": 1000}}
    with pytest.raises(BadRequest, match="requested more than once"):
        codec.requested_outputs(request_for(128, *[output] * 80), classes=1000)
    with pytest.raises(BadRequest, match="requested more than once"):
        codec.requested_outputs(request_for(1, {"name": "probabilities"}, output), classes=1000)
    [once] = codec.requested_outputs(request_for(128, output), classes=1000)
    assert once.parameters == {"classification": 1000}


def test_a_response_over_the_value_limit_is_refused_before_inference() -> None:
    classes = 1000
    images = codec.MAX_OUTPUT_VALUES // classes
    assert codec.requested_outputs(request_for(images), classes)
    with pytest.raises(BadRequest, match=f"limit is {codec.MAX_OUTPUT_VALUES}"):
        codec.requested_outputs(request_for(images + 1), classes)
    # With classification, k values an image count, not every class.
    top5 = {"name": "probabilities", "parameters": {"classification": 5}}
    assert codec.requested_outputs(request_for(images + 1, top5), classes)
