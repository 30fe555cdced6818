"""A real server under traffic: SIGTERM drains without losing a request, slow and hostile
clients are cut off, and JSON logs come out one object per line."""

from __future__ import annotations

import json
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from support import ServerProcess, photo

pytestmark = pytest.mark.e2e


@contextmanager
def server_process(**env: str) -> Iterator[ServerProcess]:
    """A ready server whose stopping the test itself controls (and checks)."""
    with tempfile.TemporaryDirectory() as folder:
        server = ServerProcess(Path(folder) / "server.log", **env)
        try:
            server.wait_ready()
            yield server
        finally:
            if server.process.poll() is None:
                server.process.kill()
            server.process.wait()


def test_sigterm_under_load_answers_every_accepted_request_and_exits_zero() -> None:
    image = photo("chelsea.jpg")
    outcomes: list[tuple[str, float, int | str, str | None]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    response = http.post(
                        "/v1/predict", content=image, headers={"Content-Type": "image/jpeg"}
                    )
                except httpx.HTTPError as exc:
                    with lock:
                        outcomes.append(("error", sent, type(exc).__name__, None))
                    return
                with lock:
                    outcomes.append(
                        ("http", sent, response.status_code, response.headers.get("Retry-After"))
                    )
                if response.status_code == 503:
                    return  # a real client goes to another replica now

    with server_process(EVALSERVE_DRAIN_DELAY_S="1.5") as server:
        process, url = server.process, server.url
        threads = [threading.Thread(target=client, args=(url,)) for _ in range(16)]
        for thread in threads:
            thread.start()
        time.sleep(3.0)
        terminated_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        # Readiness turns 503 at once, while the port is still open.
        ready = httpx.get(f"{url}/health/ready", timeout=5)
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "draining"
        process.wait(timeout=90)
        output = server.output()
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    errors = [o for o in outcomes if o[0] == "error"]
    assert errors == [], f"connection errors: {errors}"
    statuses = [o[2] for o in outcomes]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) > 16
    after = [o for o in outcomes if o[1] > terminated_at]
    assert any(o[2] == 503 for o in after), "no request was turned away while draining"
    assert all(o[3] == "1" for o in outcomes if o[2] == 503), "503 without Retry-After"
    # Requests in flight at SIGTERM were answered, not dropped: each client got 200s before its
    # one 503, and no 500s or resets anywhere.
    assert statuses.count(503) <= 16
    assert process.returncode == 0, output
    assert "Traceback" not in output
    assert "drained in" in output


def test_a_trickling_upload_is_cut_off_with_408() -> None:
    with (
        server_process(EVALSERVE_BODY_TIMEOUT_S="1") as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock,
    ):
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 100000\r\n\r\n"
        )
        started = time.monotonic()
        reply = b""
        sock.settimeout(0.3)
        while b"\r\n\r\n" not in reply and time.monotonic() - started < 20:
            try:
                sock.sendall(b"\xff")  # one byte at a time, far too slowly
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        # The server is fine afterwards.
        response = httpx.post(f"{server.url}/v1/predict", files={"file": photo("chelsea.jpg")})
        assert response.status_code == 200


def test_oversized_headers_are_refused_and_the_server_keeps_serving() -> None:
    with (
        server_process(EVALSERVE_MAX_HEADER_BYTES="4096") as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock,
    ):
        sock.sendall(
            b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
        )
        reply = b""
        deadline = time.monotonic() + 10
        while b"header_too_large" not in reply and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
        assert b"header_too_large" in reply
        assert httpx.get(f"{server.url}/health/live").status_code == 200


def test_json_log_format_gives_one_object_per_line() -> None:
    with server_process(EVALSERVE_LOG_FORMAT="json") as server:
        url = server.url
        response = httpx.post(
            f"{url}/v1/predict",
            files={"file": ("cat.jpg", photo("chelsea.jpg"))},
            headers={"X-Request-ID": "json-7"},
        )
        assert response.status_code == 200
        server.stop()
        output = server.output()
    entries = [json.loads(line) for line in output.splitlines() if line.strip()]
    access = [e for e in entries if e.get("request_id") == "json-7"]
    assert len(access) == 1
    assert access[0]["status"] == 200 and access[0]["path"] == "/v1/predict"
    assert access[0]["images"] == 1 and access[0]["model"] == "efficientnet_lite0"
    assert any(e["logger"].startswith("uvicorn") for e in entries)  # uvicorn's lines too
