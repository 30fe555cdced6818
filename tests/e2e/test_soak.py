"""Soak: 5,000 predictions in a row against a real server subprocess. Its resident memory stays
flat, every answer is 200, and the metrics account for every image."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import ROOT

pytestmark = pytest.mark.e2e

MODEL = "digits"
TOTAL = 5000
MARK = 500  # resident memory is read after this many, and again at the end
CLIENTS = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]

    def rss(self) -> int:
        """The server process's resident memory (VmRSS), in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                value, unit = line.split()[1:3]
                assert unit == "kB", line
                return int(value) * 1024
        raise AssertionError(f"VmRSS not in /proc/{self.process.pid}/status")


@contextmanager
def running_server(log: Path) -> Iterator[Server]:
    """``python -m app serve`` on a free port of 127.0.0.1, its output (an access-log line per
    request) in ``log`` rather than a pipe nobody reads; stopped with SIGTERM, it must exit 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "EVALSERVE_DEVICE": "cpu",
        "EVALSERVE_TORCH_THREADS": "2",
        "EVALSERVE_DRAIN_DELAY_S": "0",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"server not ready:\n{log.read_text()}"
            try:
                if httpx.get(f"{url}/health/ready", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield Server(url, process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
    output = log.read_text()
    assert process.returncode == 0, output[-5000:]
    assert "Traceback" not in output, output[-5000:]


def metric(text: str, sample: str, **labels: str) -> float:
    """One sample's value from a Prometheus text exposition."""
    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and s.labels == labels
    ]
    assert len(found) == 1, f"{sample}{labels}: {found}"
    return found[0]


@dataclass
class Tally:
    statuses: Counter[int]
    correct: int = 0
    sent: int = 0


async def predict_many(
    http: httpx.AsyncClient, images: list[tuple[str, bytes]], start: int, stop: int, tally: Tally
) -> None:
    """Requests ``start`` to ``stop`` (image ``i % len(images)``), ``CLIENTS`` at a time."""
    indices = iter(range(start, stop))

    async def client() -> None:
        for i in indices:  # shared: each index is taken by exactly one client
            label, data = images[i % len(images)]
            tally.sent += 1
            response = await http.post(
                f"/v1/models/{MODEL}/predict",
                content=data,
                headers={"Content-Type": "image/png"},
            )
            tally.statuses[response.status_code] += 1
            if response.status_code == 200:
                top = response.json()["predictions"][0]["classes"][0]["label"]
                tally.correct += top == label
            else:
                print(f"request {i}: {response.status_code} {response.text}")

    await asyncio.gather(*(client() for _ in range(CLIENTS)))


def test_5000_predictions_in_a_row_keep_memory_flat_and_every_image_counted(
    digits_test_split: Path, tmp_path: Path
) -> None:
    images = [
        (path.parent.name, path.read_bytes()) for path in sorted(digits_test_split.glob("*/*.png"))
    ]
    assert len(images) == 360
    tally = Tally(Counter())

    with running_server(tmp_path / "server.log") as server:

        async def soak() -> tuple[int, int]:
            limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
            async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
                await predict_many(http, images, 0, MARK, tally)
                at_mark = server.rss()
                await predict_many(http, images, MARK, TOTAL, tally)
                return at_mark, server.rss()

        started = time.monotonic()
        at_mark, at_end = asyncio.run(soak())
        seconds = time.monotonic() - started
        with httpx.Client(base_url=server.url, timeout=30) as http:
            text = http.get("/metrics").text

    mb = 2**20
    change = (at_end - at_mark) / at_mark
    print(
        f"soak: {tally.sent} requests in {seconds:.1f}s, statuses {dict(tally.statuses)}, "
        f"top-1 {tally.correct / tally.sent:.2%}; server RSS after {MARK}: {at_mark / mb:.1f} MB, "
        f"after {TOTAL}: {at_end / mb:.1f} MB ({change:+.1%})"
    )
    assert tally.sent == TOTAL
    assert tally.statuses == Counter({200: TOTAL}), tally.statuses
    # The answers are right, not merely 200: the held-out accuracy is 99.44%.
    assert tally.correct / TOTAL >= 0.98
    assert abs(change) <= 0.10, f"RSS {at_mark / mb:.1f} MB -> {at_end / mb:.1f} MB"
    assert metric(text, "evalserve_queue_depth", model=MODEL) == 0.0
    # Exactly the images sent: warm-up is not counted, and nothing else went to this model.
    assert metric(text, "evalserve_images_processed_total", model=MODEL) == TOTAL
