"""Clients that survive a connection lost before an answer, against a real server behind a TCP
proxy on 127.0.0.1 that misbehaves on chosen requests: it resets (RST) or closes (FIN) the
connection after reading a request, without forwarding it; cuts an answer off midway; or never
answers. ``app.client`` must resend the first two kinds, report how often, and raise on the
others; ``evaluate --url`` and ``bench`` must report the resends.

What the server did is read from its own ``/metrics`` (straight, not through the proxy), and what
reached the proxy from the proxy's own counts, not from the client under test.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from support import CAT_CLASSES, fixture, live_server, metric

from app.client import AsyncClient, Client, Retried
from app.tools import bench
from app.tools.cli import main

pytestmark = pytest.mark.e2e

PREDICT = {"route": "/v1/predict", "method": "POST"}
DIGITS = {"route": "/v1/models/{name}/predict", "method": "POST"}


def read_message(sock: socket.socket, buffer: bytes) -> tuple[bytes | None, bytes]:
    """One HTTP/1.1 message (head and Content-Length body) from ``sock``, and what follows it;
    None at end of file."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            return None, b""
        buffer += data
    head_end = buffer.index(b"\r\n\r\n") + 4
    length = 0
    for line in buffer[:head_end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buffer) < head_end + length:
        data = sock.recv(65536)
        if not data:
            return None, b""
        buffer += data
    return buffer[: head_end + length], buffer[head_end + length :]


def reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN: SO_LINGER on, with a zero timeout."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Proxy:
    """A TCP proxy in front of ``upstream`` that reads one request at a time and, for the POSTs
    numbered in ``plan`` (from 1, across connections), instead of forwarding it:

    - ``reset``: sends an RST, no response byte;
    - ``close``: closes the connection (FIN), no response byte;
    - ``cut``: forwards it, then sends the answer's head and half its body, and an RST;
    - ``hang``: never answers.

    Everything else is forwarded to the server and its answer relayed."""

    def __init__(self, upstream: str, plan: dict[int, str]) -> None:
        self.upstream = httpx.URL(upstream)
        self.plan = plan
        self.posts = 0  # POSTs read from clients, forwarded or not
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        upstream: socket.socket | None = None
        buffer = upstream_buffer = b""
        try:
            while True:
                request, buffer = read_message(conn, buffer)
                if request is None:
                    return
                action = None
                if request.startswith(b"POST "):
                    with self._lock:
                        self.posts += 1
                        action = self.plan.get(self.posts)
                if action == "reset":
                    reset(conn)
                    return
                if action == "close":
                    conn.close()
                    return
                if action == "hang":
                    self._stop.wait()
                    return
                if upstream is None:
                    port = self.upstream.port
                    assert port is not None
                    upstream = socket.create_connection((self.upstream.host, port))
                upstream.sendall(request)
                response, upstream_buffer = read_message(upstream, upstream_buffer)
                assert response is not None, "the server closed the connection"
                if action == "cut":
                    body_starts = response.index(b"\r\n\r\n") + 4
                    conn.sendall(response[: body_starts + (len(response) - body_starts) // 2])
                    time.sleep(0.2)  # let the client read what came before the RST
                    reset(conn)
                    return
                conn.sendall(response)
        except OSError:
            return
        finally:
            conn.close()
            if upstream is not None:
                upstream.close()

    def close(self) -> None:
        self._stop.set()
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        self._listener.close()
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with live_server() as (url, _):
        yield url


@pytest.fixture
def proxy(server: str) -> Iterator[Proxy]:
    """A proxy that forwards everything, until a test gives it a plan."""
    found = Proxy(server, {})
    try:
        yield found
    finally:
        found.close()


def answered(server: str, route: dict[str, str] = PREDICT, status: str = "200") -> float:
    """Requests on ``route`` the server has answered with ``status`` so far."""
    text = httpx.get(f"{server}/metrics").text
    try:
        return metric(text, "evalserve_requests_total", **route, status=status)
    except AssertionError:  # no such request yet
        return 0.0


def test_client_resends_a_request_whose_connection_was_reset_before_any_answer(
    server: str, proxy: Proxy
) -> None:
    proxy.plan = {1: "reset", 2: "reset"}
    before = answered(server)
    with Client(proxy.url) as client:
        prediction = client.predict(fixture("chelsea.jpg"), top_k=1)
        assert client.retried == Retried(connection=2, overloaded=0)
    assert prediction.classes[0].label in CAT_CLASSES
    assert proxy.posts == 3
    assert proxy.connections == 3  # a reset connection is not reused
    # The two reset requests never reached the server; the third was answered once.
    assert answered(server) - before == 1


def test_async_client_resends_a_request_whose_connection_was_closed_before_any_answer(
    server: str, proxy: Proxy
) -> None:
    proxy.plan = {1: "close"}  # a FIN: httpx raises "Server disconnected without ..."
    before = answered(server)

    async def scenario() -> Retried:
        async with AsyncClient(proxy.url) as client:
            prediction = await client.predict(fixture("chelsea.jpg"), top_k=1)
            assert prediction.classes[0].label in CAT_CLASSES
            return client.retried

    assert asyncio.run(scenario()) == Retried(connection=1, overloaded=0)
    assert proxy.posts == 2
    assert answered(server) - before == 1


def test_client_gives_up_on_lost_connections_after_its_retries(proxy: Proxy) -> None:
    proxy.plan = dict.fromkeys(range(1, 10), "reset")
    with Client(proxy.url, retries=2) as client:
        with pytest.raises(httpx.NetworkError):
            client.predict(fixture("chelsea.jpg"))
        assert client.retried == Retried(connection=2, overloaded=0)
    assert proxy.posts == 3  # the first try and two resends


def test_an_answer_cut_off_midway_is_not_resent(server: str, proxy: Proxy) -> None:
    proxy.plan = {1: "cut"}
    before = answered(server)
    with Client(proxy.url) as client:
        with pytest.raises(httpx.TransportError):
            client.predict(fixture("chelsea.jpg"))
        assert client.retried == Retried()
    assert proxy.posts == 1
    assert answered(server) - before == 1  # the server did answer; the proxy cut it off


def test_a_timeout_is_not_resent(proxy: Proxy) -> None:
    proxy.plan = {1: "hang"}
    with Client(proxy.url, timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.predict(fixture("chelsea.jpg"))
        assert client.retried == Retried()
    assert proxy.posts == 1


def test_evaluate_through_the_server_reports_its_resends(
    server: str, proxy: Proxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for digit in ("3", "7"):
        (tmp_path / digit).mkdir()
        for i in range(2):
            Image.new("L", (8, 8), 16 * i).save(tmp_path / digit / f"{i}.png")
    proxy.plan = {1: "reset", 2: "close"}  # the first image's first two tries
    before = answered(server, DIGITS)
    args = ["evaluate", "--url", proxy.url, "--model", "digits", "--concurrency", "1"]
    assert main([*args, str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "images 4, evaluated 4, unreadable 0"
    assert out[4] == "retries: 2 after a lost connection, 0 after a 503"
    assert proxy.posts == 6
    assert answered(server, DIGITS) - before == 4


def test_bench_resends_a_request_lost_before_an_answer_and_counts_it(proxy: Proxy) -> None:
    # POST 1 opens the connection (uncounted); in the level, POST 2 is reset before the server
    # sees it and resent, and POST 3's answer is cut off: an error, not resent.
    proxy.plan = {2: "reset", 3: "cut"}
    images = bench.web_jpegs()
    level = asyncio.run(bench.drive(proxy.url, "digits", images, 1, 1.0, None))
    assert level.retries == 1
    assert level.errors == 1
    assert len(level.connection_errors) == 1
    assert level.requests > 0
    # What the server counted: every answered request and the cut one, not the reset one.
    assert level.server_requests == level.requests + level.errors
    assert proxy.posts == level.requests + level.errors + level.retries + 1
