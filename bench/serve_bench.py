"""Served throughput and latency against the in-process limit, in one run on one machine.

    python bench/serve_bench.py                      # starts its own server on the default model
    python bench/serve_bench.py --url http://127.0.0.1:8000 --concurrency 1 4 16

In-process: decode + preprocessing + forward pass of the same JPEGs at the server's batch size,
with the server's own code (``load_image`` then ``Classifier.predict``), no HTTP.
Served: async httpx clients in this process, each sending one image per request back to back.
Results print as a table and, with ``--json``, are written as JSON. Not a test: timings vary.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import Settings  # noqa: E402
from app.preprocessing import ImageTransform, load_image  # noqa: E402
from app.repository import discover  # noqa: E402
from app.runtime import Classifier, resolve_device  # noqa: E402

PHOTOS = ["chelsea", "coffee", "rocket", "astronaut", "motorcycle", "retina", "hubble", "camera"]


def web_jpegs() -> list[bytes]:
    """The test photographs re-encoded as typical web uploads: about 500x375, quality 90."""
    images = []
    for name in PHOTOS:
        image = Image.open(ROOT / "tests" / "fixtures" / f"{name}.jpg").convert("RGB")
        image = image.resize((500, 375), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def in_process(settings: Settings, model: str, images: list[bytes], seconds: float) -> dict:
    spec = discover(settings.model_repository)[model]
    classifier = Classifier(spec, resolve_device(settings.device), settings.torch_threads)
    transform = ImageTransform.from_spec(spec.preprocessing)
    batch_size = settings.max_batch_size
    payload = [images[i % len(images)] for i in range(batch_size)]
    try:
        classifier.warm_up(batch_size)
        with ThreadPoolExecutor(settings.decode_threads) as pool:

            def one_batch() -> None:
                arrays = list(
                    pool.map(
                        lambda data: load_image(data, "x", settings.max_image_pixels, transform),
                        payload,
                    )
                )
                classifier.executor.submit(
                    classifier.predict, [(a, settings.default_top_k) for a in arrays]
                ).result()

            one_batch()
            batches, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                one_batch()
                batches += 1
            elapsed = time.perf_counter() - start
    finally:
        classifier.close()
    return {
        "batch_size": batch_size,
        "images_per_s": batches * batch_size / elapsed,
        "batch_latency_ms": 1000 * elapsed / batches,
    }


async def drive(url: str, model: str, images: list[bytes], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one_client(offset: int) -> None:
            nonlocal errors
            i = offset
            while time.perf_counter() < stop_at:
                data = images[i % len(images)]
                i += 1
                began = time.perf_counter()
                response = await client.post(
                    f"/v1/models/{model}/predict",
                    content=data,
                    headers={"Content-Type": "image/jpeg"},
                )
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - began)
                else:
                    errors += 1

        # One request each to open the connections, not counted.
        await asyncio.gather(
            *(
                client.post(
                    f"/v1/models/{model}/predict",
                    content=images[0],
                    headers={"Content-Type": "image/jpeg"},
                )
                for _ in range(clients)
            )
        )
        began = time.perf_counter()
        stop_at = began + seconds
        await asyncio.gather(*(one_client(k) for k in range(clients)))
        elapsed = time.perf_counter() - began
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    return {
        "concurrency": clients,
        "requests": len(latencies),
        "errors": errors,
        "images_per_s": len(latencies) / elapsed,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "mean_ms": 1000 * statistics.fmean(latencies),
    }


def start_server(model_repository: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env={**os.environ, "EVALSERVE_MODEL_REPOSITORY": str(model_repository), **env},
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise SystemExit("the server exited during start-up")
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="benchmark a running server instead of starting one")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    settings = Settings(model_repository=ROOT / "models")
    images = web_jpegs()
    results: dict = {
        "model": args.model,
        "device": str(resolve_device(settings.device)),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": settings.model_dump(mode="json"),
    }
    process = None
    if args.url:
        url = args.url
    else:
        process, url = start_server(ROOT / "models", {})
    try:
        results["served"] = [
            asyncio.run(drive(url, args.model, images, clients, args.seconds))
            for clients in args.concurrency
        ]
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    # Measured with the server stopped, so the two do not share the cores.
    results["in_process"] = in_process(settings, args.model, images, args.seconds)
    limit = results["in_process"]["images_per_s"]
    print(
        f"in-process limit: {limit:.1f} images/s at batch {settings.max_batch_size} "
        f"({results['in_process']['batch_latency_ms']:.0f} ms a batch), device {results['device']}"
    )
    print(f"{'clients':>8} {'images/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'of limit':>9}")
    for row in results["served"]:
        row["fraction_of_limit"] = row["images_per_s"] / limit
        print(
            f"{row['concurrency']:>8} {row['images_per_s']:>9.1f} {row['p50_ms']:>8.1f} "
            f"{row['p90_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['fraction_of_limit']:>9.0%}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
