"""A real server under traffic: SIGTERM drains without losing a request, slow and hostile
clients are cut off, and JSON logs come out one object per line."""

from __future__ import annotations

import itertools
import json
import re
import signal
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from support import ServerProcess, photo, ready_server

pytestmark = pytest.mark.e2e


@contextmanager
def server_process(**env: str) -> Iterator[ServerProcess]:
    """A ready server whose stopping the test itself controls (and checks)."""
    with (
        tempfile.TemporaryDirectory() as folder,
        ready_server(Path(folder) / "server.log", **env) as server,
    ):
        yield server


@dataclass
class Outcome:
    """One request as its client saw it: when it was sent and answered, and how."""

    request_id: str
    sent: float
    answered: float
    status: int | None = None  # None: a transport error instead of a response
    retry_after: str | None = None
    error: str | None = None


# One access-log line (text format) of a predict request: its status and request id.
_PREDICT_ACCESS = re.compile(
    r' evalserve\.access: \S+ "POST /v1/predict" (?P<status>\d{3}) .* request_id=(?P<id>\S+)$',
    re.M,
)
CLIENTS = 16
# No client sends for this long before the SIGTERM, so each request it had sent by then has
# reached the server: "sent before the SIGTERM" is then a fact, not a race with the signal.
SETTLE_S = 0.1


def test_sigterm_under_load_answers_every_accepted_request_and_exits_zero() -> None:
    image = photo("chelsea.jpg")
    outcomes: list[Outcome] = []
    outstanding: dict[int, float] = {}  # client -> when its current request was sent
    lock = threading.Lock()
    may_send = threading.Event()
    may_send.set()

    def client(url: str, number: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for n in itertools.count():
                may_send.wait()
                request_id = f"drain-{number}-{n}"
                with lock:
                    sent = outstanding[number] = time.monotonic()
                try:
                    response = http.post(
                        "/v1/predict",
                        content=image,
                        headers={"Content-Type": "image/jpeg", "X-Request-ID": request_id},
                    )
                except httpx.HTTPError as exc:
                    with lock:
                        del outstanding[number]
                        outcomes.append(
                            Outcome(request_id, sent, time.monotonic(), error=repr(exc))
                        )
                    return
                with lock:
                    del outstanding[number]
                    outcomes.append(
                        Outcome(
                            request_id,
                            sent,
                            time.monotonic(),
                            response.status_code,
                            response.headers.get("Retry-After"),
                        )
                    )
                if response.status_code != 200:
                    return  # a real client goes to another replica now

    def settled() -> bool | None:
        """Every client is parked at the gate or has had its request out for SETTLE_S; None
        when every client is parked (nothing would be in flight at the SIGTERM)."""
        with lock:
            if not outstanding:
                return None
            return all(time.monotonic() - sent >= SETTLE_S for sent in outstanding.values())

    with server_process(EVALSERVE_DRAIN_DELAY_S="1.5") as server:
        process, url = server.process, server.url
        threads = [
            threading.Thread(target=client, args=(url, k), daemon=True) for k in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        try:
            time.sleep(3.0)
            may_send.clear()
            deadline = time.monotonic() + 30
            while not (state := settled()):
                assert time.monotonic() < deadline, "the clients never settled"
                if state is None:
                    # Every request was answered before the clients settled (a fast server):
                    # let them send again, so that some are in flight at the SIGTERM.
                    may_send.set()
                    time.sleep(0.05)
                    may_send.clear()
                time.sleep(0.005)
            with lock:
                outstanding_at_sigterm = len(outstanding)
                terminated_at = time.monotonic()
                process.send_signal(signal.SIGTERM)
            # Readiness turns 503 at once, while the port is still open.
            ready = httpx.get(f"{url}/health/ready", timeout=5)
            assert ready.status_code == 503
            assert ready.json()["error"]["code"] == "draining"
        finally:
            may_send.set()  # the clients carry on, into a draining server
        process.wait(timeout=60)
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads), "a client is still waiting"
        output = server.output()

    errors = [o for o in outcomes if o.error is not None]
    assert errors == [], f"connection errors: {errors}"
    before = [o for o in outcomes if o.sent < terminated_at]
    after = [o for o in outcomes if o.sent > terminated_at]
    # The server's own count of the requests it had accepted and not yet answered at the drain.
    drain = re.search(r"draining: (\d+) request\(s\) in flight", output)
    assert drain is not None, output
    accepted_in_flight = int(drain[1])
    print(
        f"{len(before)} requests sent before the SIGTERM ({outstanding_at_sigterm} unanswered at "
        f"it, {accepted_in_flight} in flight by the server's count), {len(after)} after it"
    )
    # Every request sent before the SIGTERM was answered 200, those still in flight included.
    assert len(before) > CLIENTS
    assert [o for o in before if o.status != 200] == []
    assert 0 < accepted_in_flight <= CLIENTS, "nothing was in flight to drain"
    # Each client's next request went to a draining server: turned away with 503 and
    # Retry-After, never dropped, never a 500.
    turned_away = [o for o in outcomes if o.status == 503]
    assert turned_away, "no request was turned away while draining"
    assert [o.status for o in after] == [503] * CLIENTS, after
    assert all(o.retry_after == "1" for o in turned_away), "503 without Retry-After"
    # The server's own access log accounts for exactly what the clients received: every
    # answered request was logged once, with the status its client got.
    logged = {m["id"]: int(m["status"]) for m in _PREDICT_ACCESS.finditer(output)}
    assert len(logged) == len(_PREDICT_ACCESS.findall(output)), "a request id logged twice"
    received = {o.request_id: o.status for o in outcomes}
    assert Counter(logged.values()) == Counter(received.values())
    assert logged == received
    assert process.returncode == 0, output
    assert "Traceback" not in output
    drained = re.search(r"drained in ([0-9.]+)s", output)
    assert drained is not None, output
    assert float(drained[1]) >= 1.5  # the drain delay: the port stayed open that long


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
    assert access[0]["status"] == 200
    assert access[0]["path"] == "/v1/predict"
    assert access[0]["images"] == 1
    assert access[0]["model"] == "efficientnet_lite0"
    assert any(e["logger"].startswith("uvicorn") for e in entries)  # uvicorn's lines too
