"""One client, one photo at a time: p50 and p90 of LitServe and evalserve in one run.

    .venv/bin/python bench/peers/one_client.py [--seconds 20] [--rounds 2]

Starts each server in turn on 127.0.0.1 (never two at once, so they never share the cores),
waits until it answers, posts the cat photo as multipart (as ``curl -F file=@cat.jpg`` does)
for ``--seconds`` after a short warm-up, and stops it; ``--rounds`` repeats the series so drift
on a shared machine shows. Prints one line per server and round, and the in-process single-image
time of each evalserve runtime for the target (p50 <= 1.15 x single + 2 ms). A benchmark, not
a test. Needs ``pip install litserve``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
CAT = ROOT / "app" / "photos" / "chelsea.jpg"
PYTHON = sys.executable

SERVERS = {
    "litserve (torch)": (
        [PYTHON, str(ROOT / "bench" / "peers" / "litserve_server.py"), "--port", "8200"],
        {},
        "http://127.0.0.1:8200/predict",
        "http://127.0.0.1:8200/health",
    ),
    "evalserve (torch)": (
        [PYTHON, "-m", "app", "serve", "--port", "8201"],
        {"EVALSERVE_RUNTIME": "torch"},
        "http://127.0.0.1:8201/v1/predict",
        "http://127.0.0.1:8201/health/ready",
    ),
    "evalserve (onnxruntime)": (
        [PYTHON, "-m", "app", "serve", "--port", "8202"],
        {"EVALSERVE_RUNTIME": "onnxruntime"},
        "http://127.0.0.1:8202/v1/predict",
        "http://127.0.0.1:8202/health/ready",
    ),
}


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode})")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} never answered")


def measure(url: str, seconds: float) -> tuple[float, float, int]:
    image = CAT.read_bytes()
    latencies = []
    with httpx.Client(timeout=60) as client:
        for _ in range(20):  # warm-up: connections, caches, lazy imports
            client.post(url, files={"file": ("cat.jpg", image)}).raise_for_status()
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            began = time.perf_counter()
            client.post(url, files={"file": ("cat.jpg", image)}).raise_for_status()
            latencies.append(time.perf_counter() - began)
    ordered = sorted(latencies)
    return 1000 * statistics.median(ordered), 1000 * ordered[int(0.9 * len(ordered))], len(ordered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    environment = {**os.environ, "EVALSERVE_LOG_LEVEL": "warning", "EVALSERVE_DEVICE": "cpu"}
    for round_ in range(1, args.rounds + 1):
        for name, (command, env, url, health) in SERVERS.items():
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**environment, **env},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_ready(health, process)
                p50, p90, count = measure(url, args.seconds)
            finally:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
            print(
                f"round {round_} {name:<24} p50 {p50:6.1f} ms  p90 {p90:6.1f} ms  "
                f"({count} requests, {count / args.seconds:.1f}/s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
