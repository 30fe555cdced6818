"""Soak: 5,000 predictions in a row against a real server subprocess. Its resident memory stays
flat, every answer is 200, and the metrics account for every image."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from support import metric, running_server

pytestmark = pytest.mark.e2e

MODEL = "digits"
TOTAL = 5000
MARK = 500  # resident memory is read after this many, and again at the end
CLIENTS = 8


@dataclass
class Tally:
    statuses: Counter[int]
    correct: int = 0


async def predict_many(
    http: httpx.AsyncClient, images: list[tuple[str, bytes]], start: int, stop: int, tally: Tally
) -> None:
    """Requests ``start`` to ``stop`` (image ``i % len(images)``), ``CLIENTS`` at a time."""
    indices = iter(range(start, stop))

    async def client() -> None:
        for i in indices:  # shared: each index is taken by exactly one client
            label, data = images[i % len(images)]
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
                at_mark = server.memory()
                await predict_many(http, images, MARK, TOTAL, tally)
                return at_mark, server.memory()

        started = time.monotonic()
        at_mark, at_end = asyncio.run(soak())
        seconds = time.monotonic() - started
        with httpx.Client(base_url=server.url, timeout=30) as http:
            text = http.get("/metrics").text

    mb = 2**20
    answered = sum(tally.statuses.values())
    change = (at_end - at_mark) / at_mark
    print(
        f"soak: {answered} requests in {seconds:.1f}s, statuses {dict(tally.statuses)}, "
        f"top-1 {tally.correct / answered:.2%}; server RSS after {MARK}: {at_mark / mb:.1f} MB, "
        f"after {TOTAL}: {at_end / mb:.1f} MB ({change:+.1%})"
    )
    # The server's own count: every request reached the predict route and was answered 200.
    served = metric(
        text,
        "evalserve_requests_total",
        route="/v1/models/{name}/predict",
        method="POST",
        status="200",
    )
    assert served == TOTAL, f"the server answered {served:.0f} predictions with 200"
    assert tally.statuses == Counter({200: TOTAL}), tally.statuses
    # The answers are right, not merely 200: the held-out accuracy is 99.44%.
    assert tally.correct / TOTAL >= 0.98
    assert abs(change) <= 0.10, f"RSS {at_mark / mb:.1f} MB -> {at_end / mb:.1f} MB"
    assert metric(text, "evalserve_queue_depth", model=MODEL) == 0.0
    # Exactly the images sent: warm-up is not counted, and nothing else went to this model.
    assert metric(text, "evalserve_images_processed_total", model=MODEL) == TOTAL
