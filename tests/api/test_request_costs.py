"""What one request may cost (issue 15, item 6), in process on the real default model: a full
queue refuses before decoding, a request's images share one pixel budget, a client that leaves
stops its decoding, heavy /v2 parsing and encoding leave the event loop, and a /v2 crash keeps
the protocol's error shape."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager
from fastapi.testclient import TestClient
from PIL import Image
from starlette.types import Message
from support import DEFAULT_MODEL, make_settings, photo

import app.api.inference as inference
from app.api.v2 import codec
from app.main import create_app

INFER = f"/v2/models/{DEFAULT_MODEL}/infer"


class Calls:
    """Wraps a function of ``inference`` to count (and optionally slow) its calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, delay_s: float = 0.0) -> None:
        self.count = 0
        self.threads: list[str] = []
        self.started = threading.Event()
        real = getattr(inference, name)

        def wrapper(*args: Any) -> Any:
            self.count += 1
            self.threads.append(threading.current_thread().name)
            self.started.set()
            time.sleep(delay_s)
            return real(*args)

        monkeypatch.setattr(inference, name, wrapper)


def png(size: int, noise: bool = False) -> bytes:
    """A size x size PNG: one colour, or noise (about 3 bytes a pixel, incompressible)."""
    pixels = np.random.default_rng(7).integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels) if noise else Image.new("RGB", (size, size), (120, 80, 40))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = make_settings(max_request_pixels=300_000)
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def test_a_full_queue_answers_503_before_decoding_anything(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes, decodes = Calls(monkeypatch, "_read_headers"), Calls(monkeypatch, "load_image")
    batcher = client.app.state.serving.models[DEFAULT_MODEL].batcher  # type: ignore[attr-defined]
    # All but one place is held by images of other requests, still decoding.
    held = client.portal.call(batcher.announce, batcher.max_queue_size - 1)  # type: ignore[union-attr]
    try:
        two = [("file", (f"cat{i}.jpg", photo("chelsea.jpg"))) for i in range(2)]
        response = client.post("/v1/predict", files=two)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "overloaded"
        assert response.headers["Retry-After"] == "1"
        one = client.post("/v1/predict", files={"file": photo("chelsea.jpg")})
        assert one.status_code == 200, one.text
    finally:
        client.portal.call(held.cancel)  # type: ignore[union-attr]
    assert (probes.count, decodes.count) == (1, 1)  # the one image that fitted, only


def test_images_over_the_request_pixel_budget_together_are_refused_before_decoding(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = Calls(monkeypatch, "load_image")
    # 350x350 is 122,500 pixels: two fit the budget of 300,000, three do not.
    files = [("file", (f"p{i}.png", png(350))) for i in range(3)]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "payload_too_large"
    assert "367500 pixels together" in error["message"]
    assert decodes.count == 0
    assert client.post("/v1/predict", files=files[:2]).status_code == 200
    assert decodes.count == 2


def test_a_v2_crash_answers_in_the_protocols_error_shape(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*_: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(codec, "split_body", crash)
    response = client.post(INFER, content=b"{}", headers={"Content-Type": "application/json"})
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error"}


def test_large_v2_bodies_are_parsed_and_large_responses_built_off_the_event_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, str] = {}
    for name in ("split_body", "encode_response"):
        real = getattr(codec, name)

        def wrapper(*args: Any, real: Any = real, name: str = name) -> Any:
            seen[name] = threading.current_thread().name
            return real(*args)

        monkeypatch.setattr(codec, name, wrapper)

    noise = base64.b64encode(png(100, noise=True)).decode()  # 40 KB for 10,000 pixels

    def infer(images: int) -> dict[str, Any]:
        data = [noise] * images
        body = {
            "inputs": [{"name": "image", "shape": [images], "datatype": "BYTES", "data": data}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 1000}}],
        }
        response = client.post(INFER, json=body)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    # One image: a 40 KB body and 1,000 strings back, both done on the event loop.
    assert infer(1)["outputs"][0]["shape"] == [1, 1000]
    assert not seen["split_body"].startswith("decode")
    assert not seen["encode_response"].startswith("decode")
    # Nine: a 360 KB body and 9,000 strings back, both in the decode pool.
    assert infer(9)["outputs"][0]["shape"] == [9, 1000]
    assert seen["split_body"].startswith("decode"), seen
    assert seen["encode_response"].startswith("decode"), seen


def test_a_client_that_leaves_stops_the_decoding_of_its_images(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Six images, one decode thread, each decode 0.3 s: the client leaves during the first.
    Before, all six were decoded (and only then was the disconnect noticed)."""
    decodes = Calls(monkeypatch, "load_image", delay_s=0.3)
    images = [photo("chelsea.jpg")] * 6
    boundary = "leaving"
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c{i}.jpg"\r\n'
            f"\r\n".encode()
            + data
            + b"\r\n"
            for i, data in enumerate(images)
        )
        + f"--{boundary}--\r\n".encode()
    )

    async def scenario() -> list[Message]:
        app = create_app(make_settings(decode_threads=1))
        sent: list[Message] = []
        async with LifespanManager(app, startup_timeout=120):
            delivered = False
            leave = asyncio.Event()

            async def receive() -> Message:
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await leave.wait()
                return {"type": "http.disconnect"}

            async def send(message: Message) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/v1/predict",
                "raw_path": b"/v1/predict",
                "query_string": b"",
                "root_path": "",
                "headers": [
                    (b"host", b"t"),
                    (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
                "client": ("127.0.0.1", 5000),
                "server": ("t", 80),
                "state": {},
            }
            call = asyncio.ensure_future(app(scope, receive, send))
            assert await asyncio.to_thread(decodes.started.wait, 60)
            leave.set()
            await asyncio.wait_for(call, 30)
            # The server still serves, and the pool is free again at once.
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                response = await http.post("/v1/predict", files={"file": photo("chelsea.jpg")})
                assert response.status_code == 200, response.text
        return sent

    sent = asyncio.run(scenario())
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 400
    answer = json.loads(
        b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    )
    assert "disconnected" in answer["error"]["message"]
    # The decode under way when it left, and the one request after: not the other five.
    assert decodes.count == 2, decodes.count
    assert np.all(np.array(decodes.threads) != "MainThread")
