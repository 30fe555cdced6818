"""SIGTERM under clients that never stop posting (they ignore Retry-After): twenty drains in a
row, and no client that sent a request is reset or left without an answer.

Before the fix every such drain reset nearly every client: closing the listening socket reset
the connections still in its accept queue, uvicorn's shutdown closed connections whose request
had not been read yet, and a 503 answered before the body was read closed the socket with the
rest of the body unread (the kernel then resets instead of closing)."""

from __future__ import annotations

import select
import signal
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from support import ServerProcess, photo

pytestmark = pytest.mark.e2e

DRAINS = 20
PHOTO_POSTERS = 8  # httpx clients posting a photo in one piece, over keep-alive connections
SLOW_UPLOADERS = 8  # from the SIGTERM on: raw sockets, one request each, the body in slices
LOAD_S = 0.5  # traffic before each SIGTERM
AHEAD = 2  # servers starting while one drains (start-up, not the drain, takes the time)
SERVER_ENV = {
    "EVALSERVE_DEFAULT_MODEL": "tiny",
    "EVALSERVE_MAX_BATCH_SIZE": "4",
    "EVALSERVE_DECODE_THREADS": "1",
    "EVALSERVE_DRAIN_DELAY_S": "0.5",
}
# Over uvicorn's 64 KiB read high-water mark, so a body nobody reads stays partly unread.
IMAGE = photo("hubble.jpg")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-model repository holding a tiny TorchScript classifier: twenty servers must start
    in time, and TorchScript loads in a fraction of a second where the shipped models' load
    takes seconds (each server starts while the one before it drains)."""
    import torch
    from torch import nn

    folder = tmp_path_factory.mktemp("tiny")
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    torch.jit.script(net.eval()).save(str(folder / "model.pt"))  # as tests/api do
    (folder / "labels.txt").write_text("".join(f"class {n}\n" for n in range(5)))
    (folder / "model.toml").write_text(
        '[model]\nsource = "torchscript"\nfile = "model.pt"\n\n[labels]\nfile = "labels.txt"\n\n'
        "[preprocessing]\nresize = 8\ncrop = 8\nmean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\n"
    )
    return folder


@dataclass
class Drain:
    """What the clients saw of one server's drain, and how the server ended."""

    outcomes: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)  # requests sent and never answered
    exit_code: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, outcome: str, lost: bool) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if lost:
                self.lost.append(outcome)


def post_photos(url: str, drain: Drain, stop: threading.Event) -> None:
    """Posts until stopped, whatever the answer; a refused connection (the port is closed:
    nothing was sent) is the only failure that loses nothing."""
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            try:
                response = http.post(
                    "/v1/predict", content=IMAGE, headers={"Content-Type": "image/jpeg"}
                )
            except httpx.ConnectError:
                drain.record("refused", lost=False)
                return  # the port is closed: a real client goes to another replica
            except httpx.HTTPError as exc:
                drain.record(f"{type(exc).__name__}: {exc}", lost=True)
                continue
            drain.record(str(response.status_code), lost=False)


def upload_slowly(port: int, drain: Drain, stop: threading.Event) -> None:
    """One request per connection: the head, then the body in 8 KiB slices, then the answer
    read to the end. Any error once connected (a reset while sending or reading, or the
    connection closed with no answer) means the server dropped a request it had been sent."""
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: %d\r\n\r\n" % len(IMAGE)
    )
    while not stop.is_set():
        with socket.socket() as sock:
            sock.settimeout(30)
            try:
                sock.connect(("127.0.0.1", port))
            except ConnectionRefusedError:
                drain.record("refused", lost=False)
                return
            try:
                sock.sendall(head)
                # As over a slow link: the draining server's 503 comes while the body is still
                # on its way (it answers before reading the body), and the client, like most,
                # sends the whole body before reading any answer. A reset arriving meanwhile
                # fails the next send.
                select.select([sock], [], [], 1.0)
                for start in range(0, len(IMAGE), 8192):
                    sock.sendall(IMAGE[start : start + 8192])
                    time.sleep(0.002)
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
            except OSError as exc:
                drain.record(f"raw socket: {exc!r}", lost=True)
                continue
            if reply.startswith(b"HTTP/1.1 "):
                drain.record(f"slow upload {reply[9:12].decode()}", lost=False)
            else:
                drain.record(f"raw socket: no answer {reply[:40]!r}", lost=True)


def drain_under_load(server: ServerProcess, drain: Drain) -> None:
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(client: Callable[..., None], *args: object) -> None:
        threads.append(threading.Thread(target=client, args=(*args, drain, stop), daemon=True))
        threads[-1].start()

    try:
        for _ in range(PHOTO_POSTERS):
            start(post_photos, server.url)
        time.sleep(LOAD_S)
        server.process.send_signal(signal.SIGTERM)
        # Each is answered 503 while its body is still on its way.
        for _ in range(SLOW_UPLOADERS):
            start(upload_slowly, server.port)
        drain.exit_code = server.process.wait(timeout=60)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a client is stuck"


def test_twenty_drains_under_clients_that_keep_posting_lose_no_request(tiny_model: Path) -> None:
    began = time.monotonic()
    drains: list[Drain] = []
    env = {**SERVER_ENV, "EVALSERVE_MODEL_REPOSITORY": str(tiny_model)}
    with tempfile.TemporaryDirectory() as folder:
        servers: list[ServerProcess] = []

        def start_next() -> None:
            servers.append(ServerProcess(Path(folder) / f"server-{len(servers)}.log", **env))

        try:
            for _ in range(AHEAD):
                start_next()
            for number in range(DRAINS):
                server = servers[number]
                server.wait_ready()
                if len(servers) < DRAINS:
                    start_next()
                drain = Drain()
                drains.append(drain)
                drain_under_load(server, drain)
                assert "Traceback" not in server.output(), server.output()
        finally:
            for server in servers:
                if server.process.poll() is None:
                    server.process.kill()
                    server.process.wait()
    total: Counter[str] = sum((drain.outcomes for drain in drains), Counter())
    print(
        f"{len(drains)} drains in {time.monotonic() - began:.0f}s: {dict(total)}; "
        f"exit codes {[drain.exit_code for drain in drains]}"
    )
    assert len(drains) == DRAINS
    lost = Counter(outcome for drain in drains for outcome in drain.lost)
    assert not lost, (
        f"{lost.total()} requests lost in {sum(bool(drain.lost) for drain in drains)} of "
        f"{DRAINS} drains: {dict(lost)}"
    )
    assert [drain.exit_code for drain in drains] == [0] * DRAINS
    # Each drain was under load: clients were answered, then turned away, then refused.
    for drain in drains:
        assert drain.outcomes["503"] > 0, drain.outcomes
        assert drain.outcomes["slow upload 503"] > 0, drain.outcomes
        assert drain.outcomes["refused"] > 0, drain.outcomes
    assert total["200"] > DRAINS, total
