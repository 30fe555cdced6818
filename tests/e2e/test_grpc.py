"""The Open Inference Protocol over gRPC, spoken by tritonclient.grpc (sync and asyncio) to a
live server on 127.0.0.1: the same answers as REST, the same batches, and the same refusals,
mapped to gRPC status codes."""

from __future__ import annotations

import asyncio
import io
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from PIL import Image
from support import (
    CAT_CLASSES,
    COFFEE_CLASSES,
    MODELS,
    ServerProcess,
    classifier_of,
    live_server,
    metric,
    photo,
)
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from app.model.repository import load_spec
from app.preprocessing import ImageTransform

pytestmark = pytest.mark.e2e
MODEL = "efficientnet_lite0"
KEY = "grpc-secret"
AUTH = {"authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, str]]:
    """A live server with API keys on; yields its HTTP URL and its gRPC address."""
    port = free_port()
    with live_server(grpc_port=port, api_keys=KEY) as (url, _):
        yield url, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def client(server: tuple[str, str]) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server[1])
    yield client
    client.close()


def encoded(*names: str) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(names)], "BYTES")
    tensor.set_data_from_numpy(np.array([photo(name) for name in names], dtype=np.object_))
    return tensor


def rest_scores(url: str, name: str) -> np.ndarray:
    response = httpx.post(
        f"{url}/v1/predict?top_k=1000",
        files={"file": photo(name)},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 200, response.text
    scores = np.zeros(1000, dtype=np.float32)
    for entry in response.json()["predictions"][0]["classes"]:
        scores[entry["index"]] = entry["score"]
    return scores


def grpc_error(call: object, *args: object, **kwargs: object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value


def test_health_and_metadata_answer_as_on_rest(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL, headers=AUTH)
    assert client.is_model_ready("digits", "1", headers=AUTH)
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "evalserve"
    assert {"classification", "binary_tensor_data"} <= set(server["extensions"])
    metadata = client.get_model_metadata(MODEL, headers=AUTH, as_json=True)
    shapes = {entry["datatype"]: entry["shape"] for entry in metadata["inputs"]}
    assert shapes == {"BYTES": ["-1"], "UINT8": ["-1", "224", "224", "3"],
                      "FP32": ["-1", "3", "224", "224"]}  # fmt: skip
    assert metadata["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": ["-1", "1000"]}
    ]
    missing = grpc_error(client.get_model_metadata, MODEL, "7", headers=AUTH)
    assert missing.status() == "StatusCode.NOT_FOUND"
    assert grpc_error(client.is_model_ready, "nope", headers=AUTH).status() == (
        "StatusCode.NOT_FOUND"
    )


def test_the_cat_photo_gets_the_rest_scores(
    server: tuple[str, str], client: triton.InferenceServerClient
) -> None:
    result = client.infer(MODEL, [encoded("chelsea.jpg")], request_id="cat-1", headers=AUTH)
    response = result.get_response()
    assert response.id == "cat-1"
    assert (response.model_name, response.model_version) == (MODEL, "1")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (1, 1000)
    np.testing.assert_allclose(probabilities[0], rest_scores(server[0], "chelsea.jpg"), atol=1e-6)
    labels = load_spec(MODELS / MODEL).labels
    assert labels[int(probabilities[0].argmax())] in CAT_CLASSES


def test_classification_parameter_returns_labelled_top_k(
    client: triton.InferenceServerClient,
) -> None:
    output = triton.InferRequestedOutput("probabilities", class_count=3)
    result = client.infer(
        MODEL, [encoded("chelsea.jpg", "coffee.jpg")], outputs=[output], headers=AUTH
    )
    classes = result.as_numpy("probabilities")
    assert classes.shape == (2, 3)
    score, index, label = classes[0, 0].decode().split(":", 2)
    assert label in CAT_CLASSES
    assert 0 < float(score) < 1
    assert int(index) in (281, 282, 285)
    assert classes[1, 0].decode().split(":", 2)[2] in COFFEE_CLASSES


def test_uint8_and_fp32_tensors_raw_and_typed(
    server: tuple[str, str], client: triton.InferenceServerClient
) -> None:
    """tritonclient sends raw_input_contents; the typed ``contents`` (what other clients send)
    go through tritonclient's own generated stub. Both give the REST scores."""
    spec = load_spec(MODELS / MODEL)
    pixels = ImageTransform.from_spec(spec.preprocessing)(
        Image.open(io.BytesIO(photo("chelsea.jpg"))).convert("RGB")
    )[None]
    expected = rest_scores(server[0], "chelsea.jpg")
    tensor = triton.InferInput("image_uint8", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    raw = client.infer(MODEL, [tensor], headers=AUTH).as_numpy("probabilities")
    np.testing.assert_allclose(raw[0], expected, atol=1e-6)

    mean = np.array(spec.preprocessing.mean, dtype=np.float32)[:, None, None]
    std = np.array(spec.preprocessing.std, dtype=np.float32)[:, None, None]
    floats = ((pixels[0].transpose(2, 0, 1) / np.float32(255) - mean) / std)[None]
    with grpc.insecure_channel(server[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        metadata = tuple(AUTH.items())
        for datatype, shape, contents in (
            ("UINT8", pixels.shape, {"uint_contents": pixels.ravel().tolist()}),
            ("FP32", floats.shape, {"fp32_contents": floats.ravel().tolist()}),
            ("BYTES", (1,), {"bytes_contents": [photo("chelsea.jpg")]}),
        ):
            request = service_pb2.ModelInferRequest(model_name=MODEL)
            request.inputs.add(
                name="x",
                datatype=datatype,
                shape=list(shape),
                contents=service_pb2.InferTensorContents(**contents),
            )
            response = stub.ModelInfer(request, metadata=metadata, timeout=60)
            typed = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
            np.testing.assert_allclose(typed, expected, atol=1e-5, err_msg=datatype)

        request = service_pb2.ModelInferRequest(model_name=MODEL)
        request.inputs.add(
            name="x",
            datatype="UINT8",
            shape=[1],
            contents=service_pb2.InferTensorContents(uint_contents=[256]),
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, metadata=metadata, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_requests_are_invalid_argument_and_the_server_goes_on(
    client: triton.InferenceServerClient,
) -> None:
    wrong_type = triton.InferInput("x", [1], "INT32")
    wrong_type.set_data_from_numpy(np.array([7], dtype=np.int32))
    error = grpc_error(client.infer, MODEL, [wrong_type], headers=AUTH)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "INT32" in error.message()
    undecodable = triton.InferInput("image", [1], "BYTES")
    undecodable.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    error = grpc_error(client.infer, MODEL, [undecodable], headers=AUTH)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "not a supported image" in error.message()
    wrong_shape = triton.InferInput("x", [1, 3, 100, 100], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 3, 100, 100), dtype=np.float32))
    assert (
        "[1, 3, 224, 224]" in grpc_error(client.infer, MODEL, [wrong_shape], headers=AUTH).message()
    )
    unknown = grpc_error(client.infer, "nope", [encoded("coffee.jpg")], headers=AUTH)
    assert unknown.status() == "StatusCode.NOT_FOUND"
    assert client.infer(MODEL, [encoded("coffee.jpg")], headers=AUTH).as_numpy(
        "probabilities"
    ).shape == (1, 1000)


def test_api_keys_travel_in_metadata(client: triton.InferenceServerClient) -> None:
    missing = grpc_error(client.infer, MODEL, [encoded("coffee.jpg")])
    assert missing.status() == "StatusCode.UNAUTHENTICATED"
    assert "API key" in missing.message()
    wrong = grpc_error(
        client.infer, MODEL, [encoded("coffee.jpg")], headers={"authorization": "Bearer nope"}
    )
    assert wrong.status() == "StatusCode.PERMISSION_DENIED"
    assert grpc_error(client.get_model_metadata, MODEL).status() == "StatusCode.UNAUTHENTICATED"
    # Health and server metadata stay open, as on REST.
    assert client.is_server_ready()


def test_the_async_client_and_the_metrics(server: tuple[str, str]) -> None:
    async def scenario() -> list[str]:
        client = triton_aio.InferenceServerClient(server[1])
        try:
            assert await client.is_server_ready()
            results = await asyncio.gather(
                *(
                    client.infer(MODEL, [encoded(name)], headers=AUTH)
                    for name in ("chelsea.jpg", "coffee.jpg") * 4
                )
            )
        finally:
            await client.close()
        labels = load_spec(MODELS / MODEL).labels
        return [labels[int(r.as_numpy("probabilities")[0].argmax())] for r in results]

    before = metrics(server[0])
    top1 = asyncio.run(scenario())
    assert all(label in CAT_CLASSES for label in top1[0::2])
    assert all(label in COFFEE_CLASSES for label in top1[1::2])
    after = metrics(server[0])
    ok = {"method": "ModelInfer", "code": "OK"}
    assert (
        metric(after, "evalserve_grpc_requests_total", **ok)
        - metric(before, "evalserve_grpc_requests_total", **ok)
        == 8
    )
    assert "evalserve_grpc_request_duration_seconds_bucket" in after


def metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics").text


def test_a_grpc_and_an_http_request_share_a_batch() -> None:
    """The model's worker thread is held while a first request's batch waits for it; an HTTP
    and a gRPC request queue behind it meanwhile, and the next batch holds both."""
    port = free_port()
    with live_server(grpc_port=port) as (url, app):
        model = app.state.serving.default_model
        batcher, held = model.batcher, threading.Event()
        worker = classifier_of(model).executor.submit(held.wait, 60)

        def over_http(name: str) -> str:
            response = httpx.post(f"{url}/v1/predict", files={"file": photo(name)}, timeout=60)
            assert response.status_code == 200, response.text
            return str(response.json()["predictions"][0]["classes"][0]["label"])

        def over_grpc(name: str) -> str:
            client = triton.InferenceServerClient(f"127.0.0.1:{port}")
            try:
                scores = client.infer(MODEL, [encoded(name)]).as_numpy("probabilities")
            finally:
                client.close()
            return load_spec(MODELS / MODEL).labels[int(scores[0].argmax())]

        def until(condition: Callable[[], bool]) -> None:
            deadline = time.monotonic() + 30
            while not condition():
                assert time.monotonic() < deadline, (batcher.depth, batcher.in_flight)
                time.sleep(0.01)

        before = batcher.stats.batches
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(over_http, "rocket.jpg")
            until(lambda: batcher.in_flight == 1 and batcher.depth == 0)  # its batch waits
            http = pool.submit(over_http, "chelsea.jpg")
            grpc_call = pool.submit(over_grpc, "coffee.jpg")
            until(lambda: batcher.depth == 2)  # both queued behind it
            held.set()
            worker.result(timeout=60)
            assert first.result(timeout=60)
            assert http.result(timeout=60) in CAT_CLASSES
            assert grpc_call.result(timeout=60) in COFFEE_CLASSES
        assert batcher.stats.batches - before == 2  # the first request's, then the shared one
        assert batcher.stats.largest_batch == 2


def test_deadlines_are_deadline_exceeded() -> None:
    port = free_port()
    with live_server(grpc_port=port, request_timeout_s=1.0) as (url, app):
        model = app.state.serving.default_model
        held = threading.Event()
        # The model's worker is busy (held) for longer than either deadline below, so the
        # calls wait in the queue until their deadline passes.
        worker = classifier_of(model).executor.submit(held.wait, 60)
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            # The server's request timeout.
            server_side = grpc_error(client.infer, MODEL, [encoded("coffee.jpg")])
            assert server_side.status() == "StatusCode.DEADLINE_EXCEEDED"
            assert "request timeout" in server_side.message()
            # The client's own deadline, shorter than the server's timeout.
            client_side = grpc_error(
                client.infer, MODEL, [encoded("coffee.jpg")], client_timeout=0.3
            )
            assert client_side.status() == "StatusCode.DEADLINE_EXCEEDED"
            held.set()
            worker.result(timeout=60)
            # And it serves again.
            assert client.infer(MODEL, [encoded("coffee.jpg")]).as_numpy("probabilities").shape
        finally:
            held.set()
            client.close()
        text = metrics(url)
        assert metric(text, "evalserve_images_rejected_total", model=MODEL, reason="timeout") >= 1
        assert (
            metric(
                text, "evalserve_grpc_requests_total", method="ModelInfer", code="DEADLINE_EXCEEDED"
            )
            >= 1
        )


def test_overload_is_unavailable_with_retry_after() -> None:
    port = free_port()
    with live_server(grpc_port=port, max_queue_size=2, max_batch_size=1, max_batch_delay_ms=0) as (
        _,
        _app,
    ):

        async def burst() -> list[tuple[grpc.StatusCode, str, str]]:
            """Each call's code, retry-after trailer and details."""
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                request = service_pb2.ModelInferRequest(model_name=MODEL)
                request.inputs.add(
                    name="image",
                    datatype="BYTES",
                    shape=[1],
                    contents=service_pb2.InferTensorContents(bytes_contents=[photo("chelsea.jpg")]),
                )

                async def one() -> tuple[grpc.StatusCode, str, str]:
                    try:
                        await stub.ModelInfer(request, timeout=60)
                    except grpc.aio.AioRpcError as exc:
                        trailers = dict(exc.trailing_metadata() or ())
                        return exc.code(), str(trailers.get("retry-after")), exc.details() or ""
                    return grpc.StatusCode.OK, "", ""

                return await asyncio.gather(*(one() for _ in range(24)))

        outcomes = asyncio.run(burst())
        codes = [code for code, _, _ in outcomes]
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, outcomes
        for code, retry_after, details in outcomes:
            if code == grpc.StatusCode.UNAVAILABLE:
                assert retry_after == "1"
                assert "capacity" in details
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        try:  # and it still serves
            assert client.infer(MODEL, [encoded("coffee.jpg")]).as_numpy("probabilities").shape
        finally:
            client.close()


def test_sigterm_finishes_grpc_calls_in_flight_and_refuses_new_ones(tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess(
        tmp_path / "server.log",
        EVALSERVE_GRPC_PORT=str(port),
        EVALSERVE_MAX_BATCH_DELAY_MS="3000",
        EVALSERVE_MAX_BATCH_SIZE="64",
        EVALSERVE_DRAIN_DELAY_S="2",
    )
    try:
        server.wait_ready()
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert client.is_server_ready()
            with ThreadPoolExecutor(4) as pool:
                # Four calls waiting for their batch (3 s) when the SIGTERM comes.
                in_flight = [
                    pool.submit(client.infer, MODEL, [encoded("chelsea.jpg")]) for _ in range(4)
                ]
                time.sleep(1.0)
                server.process.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                assert not client.is_server_ready()
                refused = grpc_error(client.infer, MODEL, [encoded("coffee.jpg")])
                assert refused.status() == "StatusCode.UNAVAILABLE"
                assert "shutting down" in refused.message()
                labels = load_spec(MODELS / MODEL).labels
                for future in in_flight:
                    scores = future.result(timeout=60).as_numpy("probabilities")
                    assert labels[int(scores[0].argmax())] in CAT_CLASSES
        finally:
            client.close()
        assert server.wait_exit(timeout=60) == 0, server.output()
        assert "Traceback" not in server.output()
    finally:
        if server.process.poll() is None:
            server.process.kill()
        server.process.wait()


def test_a_taken_grpc_port_stops_the_start_with_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServerProcess(tmp_path / "server.log", EVALSERVE_GRPC_PORT=str(port))
        assert server.wait_exit(timeout=60) == 2
    assert f"127.0.0.1:{port}" in server.output()
    assert "gRPC" in server.output()


def test_model_control_is_unimplemented_unless_turned_on(
    client: triton.InferenceServerClient,
) -> None:
    off = grpc_error(client.get_model_repository_index, headers=AUTH)
    assert off.status() == "StatusCode.UNIMPLEMENTED"
    assert "EVALSERVE_MODEL_CONTROL" in off.message()
    assert grpc_error(client.load_model, "digits").status() == "StatusCode.UNAUTHENTICATED"


def test_models_unload_and_load_over_grpc() -> None:
    port = free_port()
    with live_server(grpc_port=port, model_control=True) as (_, app):
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            index = client.get_model_repository_index(as_json=True)["models"]
            assert {(m["name"], m["state"]) for m in index} == {
                ("digits", "READY"),
                (MODEL, "READY"),
            }
            client.unload_model("digits")
            assert "digits" not in app.state.serving.models
            assert grpc_error(client.is_model_ready, "digits").status() == "StatusCode.NOT_FOUND"
            ready = client.get_model_repository_index(as_json=True)["models"]
            assert [m["name"] for m in ready if m["state"] == "READY"] == [MODEL]
            assert client.is_server_ready()  # the other model serves on
            client.load_model("digits")
            assert client.is_model_ready("digits")
            digit = triton.InferInput("x", [1, 8, 8, 1], "UINT8")
            digit.set_data_from_numpy(np.zeros((1, 8, 8, 1), dtype=np.uint8))
            assert client.infer("digits", [digit]).as_numpy("probabilities").shape == (1, 10)
            unknown = grpc_error(client.load_model, "no_such_model")
            assert unknown.status() == "StatusCode.NOT_FOUND"
            default = grpc_error(client.unload_model, MODEL)
            assert default.status() == "StatusCode.INVALID_ARGUMENT"
            sent = grpc_error(client.load_model, "digits", config='{"backend": "x"}')
            assert sent.status() == "StatusCode.INVALID_ARGUMENT"
            assert "repository only" in sent.message()
        finally:
            client.close()
