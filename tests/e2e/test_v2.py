"""The Open Inference Protocol, spoken by NVIDIA's tritonclient (the client users will point at
evalserve) to a live server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from asgi_lifespan import LifespanManager
from PIL import Image
from support import CAT_CLASSES, COFFEE_CLASSES, MODELS, live_server, make_settings, photo
from torchvision import transforms
from tritonclient.utils import InferenceServerException

from app.main import create_app
from app.model.repository import load_spec
from app.preprocessing import ImageTransform

pytestmark = pytest.mark.e2e
MODEL = "efficientnet_lite0"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with live_server() as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.removeprefix("http://"))
    yield client
    client.close()


def v1_scores(server: str, name: str) -> np.ndarray:
    response = httpx.post(f"{server}/v1/predict?top_k=1000", files={"file": photo(name)})
    assert response.status_code == 200
    scores = np.zeros(1000, dtype=np.float32)
    for entry in response.json()["predictions"][0]["classes"]:
        scores[entry["index"]] = entry["score"]
    return scores


def encoded(*names: str, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(names)], "BYTES")
    if binary:
        data = np.array([photo(name) for name in names], dtype=np.object_)
    else:  # JSON carries bytes as base64 strings
        data = np.array([base64.b64encode(photo(name)) for name in names], dtype=np.object_)
    tensor.set_data_from_numpy(data, binary_data=binary)
    return tensor


def test_server_and_model_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready("digits", "1")
    assert not client.is_model_ready("no_such_model")
    server = client.get_server_metadata()
    assert server["name"] == "evalserve"
    assert {"classification", "binary_tensor_data"} <= set(server["extensions"])
    metadata = client.get_model_metadata(MODEL)
    assert metadata["name"] == MODEL
    assert metadata["versions"] == ["1"]
    shapes = {entry["datatype"]: entry["shape"] for entry in metadata["inputs"]}
    assert shapes == {"BYTES": [-1], "UINT8": [-1, 224, 224, 3], "FP32": [-1, 3, 224, 224]}
    assert metadata["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}
    ]
    assert client.get_model_metadata("digits", "1")["outputs"][0]["shape"] == [-1, 10]
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata(MODEL, "7")
    assert missing.value.status() == "404"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_encoded_jpeg_gives_the_v1_scores(
    server: str, client: triton.InferenceServerClient, binary: bool
) -> None:
    output = triton.InferRequestedOutput("probabilities", binary_data=binary)
    result = client.infer(
        MODEL, [encoded("chelsea.jpg", binary=binary)], outputs=[output], request_id="req-9"
    )
    assert result.get_response()["id"] == "req-9"
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (1, 1000)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities[0], v1_scores(server, "chelsea.jpg"), atol=1e-6)
    labels = load_spec(MODELS / MODEL).labels
    assert labels[int(probabilities[0].argmax())] in CAT_CLASSES


def test_classification_extension_returns_labelled_top_k(
    client: triton.InferenceServerClient,
) -> None:
    for binary in (True, False):
        output = triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
        result = client.infer(MODEL, [encoded("chelsea.jpg", "coffee.jpg")], outputs=[output])
        classes = result.as_numpy("probabilities")
        assert classes.shape == (2, 3)
        first = [entry.decode() if isinstance(entry, bytes) else entry for entry in classes[:, 0]]
        score, index, label = first[0].split(":", 2)
        assert label in CAT_CLASSES
        assert 0 < float(score) < 1
        assert int(index) in (281, 282, 285)
        assert first[1].split(":", 2)[2] in COFFEE_CLASSES


def test_a_batch_of_images_in_one_request_keeps_its_order(
    server: str, client: triton.InferenceServerClient
) -> None:
    names = ["coffee.jpg", "chelsea.jpg", "rocket.jpg"]
    result = client.infer(MODEL, [encoded(*names)])  # no outputs named: all, in binary
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (3, 1000)
    for row, name in zip(probabilities, names, strict=True):
        np.testing.assert_allclose(row, v1_scores(server, name), atol=1e-6)


def test_uint8_images_at_the_input_size(server: str, client: triton.InferenceServerClient) -> None:
    spec = load_spec(MODELS / MODEL)
    transform = ImageTransform.from_spec(spec.preprocessing)
    pixels = np.stack(
        [transform(Image.open(io.BytesIO(photo(n))).convert("RGB")) for n in ("chelsea.jpg",)]
    )
    for binary in (True, False):
        tensor = triton.InferInput("image_uint8", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        probabilities = client.infer(MODEL, [tensor]).as_numpy("probabilities")
        # The same uint8 input the server makes from the JPEG itself: the same scores.
        np.testing.assert_allclose(probabilities[0], v1_scores(server, "chelsea.jpg"), atol=1e-6)


def test_fp32_tensors_preprocessed_by_the_client(
    server: str, client: triton.InferenceServerClient
) -> None:
    pre = load_spec(MODELS / MODEL).preprocessing
    pipeline = transforms.Compose(
        [
            transforms.Resize(pre.resize, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(pre.crop),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )
    names = ["coffee.jpg", "chelsea.jpg"]
    batch = torch.stack(
        [pipeline(Image.open(io.BytesIO(photo(n))).convert("RGB")) for n in names]
    ).numpy()
    for binary in (True, False):
        tensor = triton.InferInput("input_fp32", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, binary_data=binary)
        probabilities = client.infer(MODEL, [tensor]).as_numpy("probabilities")
        for row, name in zip(probabilities, names, strict=True):
            np.testing.assert_allclose(row, v1_scores(server, name), atol=1e-5)


def bad_request(client: triton.InferenceServerClient, tensor: triton.InferInput) -> str:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [tensor])
    assert caught.value.status() == "400"
    return caught.value.message()


def test_bad_inputs_are_400_with_the_protocols_error_body(
    server: str, client: triton.InferenceServerClient
) -> None:
    wrong_type = triton.InferInput("x", [1], "INT32")
    wrong_type.set_data_from_numpy(np.array([7], dtype=np.int32))
    assert "INT32" in bad_request(client, wrong_type)
    wrong_shape = triton.InferInput("x", [1, 3, 100, 100], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 3, 100, 100), dtype=np.float32))
    assert "[1, 3, 224, 224]" in bad_request(client, wrong_shape)
    undecodable = triton.InferInput("image", [1], "BYTES")
    undecodable.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    assert "not a supported image" in bad_request(client, undecodable)
    # The body itself, as the protocol defines it, and the server still serves.
    response = httpx.post(
        f"{server}/v2/models/{MODEL}/infer",
        json={"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]},
    )
    assert response.status_code == 400
    assert set(response.json()) == {"error"}
    assert "base64" in response.json()["error"]
    assert httpx.post(f"{server}/v2/models/{MODEL}/infer", content=b"{").status_code == 400
    missing = httpx.post(f"{server}/v2/models/nope/infer", json={"inputs": []})
    assert missing.status_code == 404
    assert "nope" in missing.json()["error"]
    assert client.infer(MODEL, [encoded("coffee.jpg")]).as_numpy("probabilities").shape == (
        1,
        1000,
    )


def test_v1_and_v2_requests_share_one_batch() -> None:
    async def scenario() -> None:
        app = create_app(make_settings(max_batch_delay_ms=500))
        async with LifespanManager(app, startup_timeout=120):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                body = {
                    "inputs": [
                        {
                            "name": "image",
                            "shape": [1],
                            "datatype": "BYTES",
                            "data": [base64.b64encode(photo("coffee.jpg")).decode()],
                        }
                    ],
                    "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}],
                }
                v1, v2 = await asyncio.gather(
                    client.post("/v1/predict", files={"file": photo("chelsea.jpg")}),
                    client.post(f"/v2/models/{MODEL}/infer", json=body),
                )
            assert v1.status_code == 200, v2.text
            assert v2.status_code == 200, v2.text
            assert v2.json()["outputs"][0]["data"][0].split(":", 2)[2] in COFFEE_CLASSES
            stats = app.state.serving.default_model.batcher.stats
            assert stats.batches == 1
            assert stats.largest_batch == 2

    asyncio.run(scenario())
