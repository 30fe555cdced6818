"""evalserve as a Ray Serve application (deploy/ray/serve_evalserve.py): a local Ray started by
``python -m deploy.ray.serve_evalserve`` in a subprocess, one replica on the CPU, spoken to over
HTTP through Serve's proxy on 127.0.0.1. Skipped where Ray Serve is not installed."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from support import CAT_CLASSES, DEFAULT_MODEL, MODELS, ROOT, make_settings, photo

from app.main import create_app

with warnings.catch_warnings():
    # Ray Serve's own pydantic models warn on import (PydanticDeprecatedSince20); not ours.
    warnings.simplefilter("ignore")
    pytest.importorskip("ray.serve")

pytestmark = pytest.mark.e2e

SETTINGS = {"model_repository": str(MODELS), "device": "cpu", "torch_threads": "2"}


class RayServe:
    """The Ray Serve launcher in a session of its own: every process of the local Ray it starts
    (GCS, raylet, dashboard, the Serve controller, proxy and replica) stays in that session, so
    a test can check that none outlives the stop."""

    def __init__(self, log: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "deploy.ray.serve_evalserve", "--host", "127.0.0.1"]
        settings = [f"{key}={value}" for key, value in SETTINGS.items()]
        env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port), *settings],
                cwd=ROOT,
                # No usage report (there is no network to send it over anyway).
                env={**env, "RAY_USAGE_STATS_ENABLED": "0", "EVALSERVE_GRPC_PORT": "0"},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"Ray Serve exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"Ray Serve is not ready:\n{self.output()}"
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)

    def session_processes(self) -> list[int]:
        """Live processes of the launcher's session (it starts one): itself and every Ray
        process it started, actors included (those get process groups of their own)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:  # it ended while we looked
                continue
            # The fields after the command name, which may hold spaces and parentheses.
            state, _parent, _group, session = text[text.rindex(")") + 2 :].split()[:4]
            if int(session) == self.process.pid and state != "Z":
                found.append(int(stat.parent.name))
        return found

    def stop(self, timeout: float = 120.0) -> tuple[int | None, list[int]]:
        """SIGTERM, as Ctrl-C would stop it: the exit status (None if it had to be killed) and
        the processes of its session that outlived it by 30 s (then killed)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        deadline = time.monotonic() + 30
        while self.session_processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        leftover = self.session_processes()
        for pid in leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        return code, leftover


@pytest.fixture(scope="module")
def ray_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServe]:
    served = RayServe(tmp_path_factory.mktemp("ray") / "serve.log")
    try:
        served.wait_ready()
        yield served
    finally:
        code, leftover = served.stop()
    assert code == 0, served.output()
    assert not leftover, f"processes {leftover} outlived the stop:\n{served.output()}"
    # The lifespan's shutdown ran in the replica: the batchers were drained, not killed.
    assert replica_lines(served.output(), "evalserve shutting down"), served.output()


def replica_lines(output: str, text: str) -> list[str]:
    """Lines that Ray streamed from the evalserve replica's process and that contain ``text``."""
    return [
        line
        for line in output.splitlines()
        if "ServeReplica:default:evalserve" in line and text in line
    ]


def test_models_load_in_the_replica_through_the_lifespan(ray_serve: RayServe) -> None:
    ready = replica_lines(ray_serve.output(), "evalserve ready:")
    assert len(ready) == 1, ray_serve.output()  # one replica, which ran the lifespan once
    assert DEFAULT_MODEL in ready[0]


def test_probes_answer_through_ray_serve(ray_serve: RayServe) -> None:
    ready = httpx.get(f"{ray_serve.url}/health/ready", timeout=10)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}
    assert httpx.get(f"{ray_serve.url}/v2/health/ready", timeout=10).status_code == 200


def test_open_inference_metadata_through_ray_serve(ray_serve: RayServe) -> None:
    server = httpx.get(f"{ray_serve.url}/v2", timeout=10)
    assert server.status_code == 200, server.text
    assert server.json()["name"] == "evalserve"
    model = httpx.get(f"{ray_serve.url}/v2/models/{DEFAULT_MODEL}", timeout=10)
    assert model.status_code == 200, model.text
    assert model.json()["name"] == DEFAULT_MODEL
    assert model.json()["versions"] == ["1"]


def test_cat_photo_gets_the_answer_evalserve_gives_alone(ray_serve: RayServe) -> None:
    files = {"file": ("chelsea.jpg", photo("chelsea.jpg"))}
    through_ray = httpx.post(f"{ray_serve.url}/v1/predict?top_k=5", files=files, timeout=60)
    assert through_ray.status_code == 200, through_ray.text
    with TestClient(create_app(make_settings(torch_threads=2))) as client:
        alone = client.post("/v1/predict?top_k=5", files=files)
    assert alone.status_code == 200, alone.text
    ray_classes = through_ray.json()["predictions"][0]["classes"]
    own_classes = alone.json()["predictions"][0]["classes"]
    assert ray_classes[0]["label"] in CAT_CLASSES
    assert [c["index"] for c in ray_classes] == [c["index"] for c in own_classes]
    for ray_class, own_class in zip(ray_classes, own_classes, strict=True):
        assert ray_class["score"] == pytest.approx(own_class["score"], abs=1e-5)


def test_a_grpc_port_is_refused_before_ray_starts() -> None:
    # Each replica would bind it: two on one node would clash. Refused in the launcher itself.
    result = subprocess.run(
        [sys.executable, "-m", "deploy.ray.serve_evalserve", "grpc_port=8001"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "grpc_port=8001" in result.stderr
    assert "must be 0 under Ray Serve" in result.stderr
    assert "Ray instance" not in result.stdout + result.stderr  # refused before Ray started
