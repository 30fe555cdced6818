"""The image's own commands, run here on this checkout as the container would run them: the
build-time model check, the HEALTHCHECK (which must fail when nothing listens or the server
answers 503), and the start command, which serves and stops cleanly on SIGTERM."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from deploy_support import BIN, Image, exec_form, seconds
from support import CAT_CLASSES, ROOT, photo


def test_build_time_check_loads_and_runs_every_model(image: Image) -> None:
    checks = [
        exec_form(i.value, "RUN") for i in image.final if i.keyword == "RUN" and "[" in i.value
    ]
    assert len(checks) == 1, "the runtime stage needs one exec-form RUN that loads the models"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVALSERVE_")}
    env |= {k: image.on_this_checkout(v) for k, v in image.env.items() if k != "PATH"}
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    result = subprocess.run(
        checks[0], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "efficientnet_lite0" in result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mount(volume: str | dict[str, str]) -> tuple[str, str]:
    """(host path, container path) of a compose volume, short or long syntax."""
    if isinstance(volume, dict):
        return volume["source"], volume["target"].rstrip("/")
    host, container, *_ = volume.split(":")
    return host, container.rstrip("/")


def container_env(image: Image, compose: dict[str, Any], port: int) -> dict[str, str]:
    """The environment the container gets (image ENV under compose's), mapped onto this checkout:
    mounted and copied paths point here, and the server listens on 127.0.0.1:port."""
    service = compose["services"]["evalserve"]
    mounts = [mount(volume) for volume in service.get("volumes", [])]

    def here(value: str) -> str:
        for host, container in mounts:
            if value == container or value.startswith(container + "/"):
                return host + value[len(container) :]
        return image.on_this_checkout(value)

    merged = {k: v for k, v in image.env.items() if k != "PATH"}
    merged |= {k: str(v) for k, v in service.get("environment", {}).items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVALSERVE_")}
    env |= {k: here(v) for k, v in merged.items()}
    # No gRPC port: tests run side by side, and this one speaks HTTP only.
    env |= {"EVALSERVE_HOST": "127.0.0.1", "EVALSERVE_PORT": str(port), "EVALSERVE_GRPC_PORT": "0"}
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def probe(image: Image, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, exactly, under its own timeout (a timeout is a failure)."""
    options, command = image.healthcheck
    try:
        return subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=options["timeout"] + 5
        )
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 124, "", "timed out")


def test_healthcheck_fails_when_nothing_listens(image: Image, compose: dict[str, Any]) -> None:
    result = probe(image, container_env(image, compose, free_port()))
    assert result.returncode != 0
    assert "refused" in result.stderr.lower(), result.stderr


@pytest.fixture
def not_ready_server() -> Iterator[int]:
    """A loopback HTTP server that answers 503 to everything, as evalserve does while draining."""

    class NotReady(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotReady)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_healthcheck_fails_while_the_server_answers_503(
    image: Image, compose: dict[str, Any], not_ready_server: int
) -> None:
    result = probe(image, container_env(image, compose, not_ready_server))
    assert result.returncode != 0
    assert "503" in result.stderr, result.stderr


def test_image_start_command_serves_and_stops_cleanly_on_sigterm(
    image: Image, compose: dict[str, Any], tmp_path: Path
) -> None:
    """Run the Dockerfile's CMD with the image and compose environment, wait for the HEALTHCHECK
    to pass, classify a photo over HTTP, then stop it the way `docker stop` does."""
    port = free_port()
    env = container_env(image, compose, port)
    service = compose["services"]["evalserve"]
    grace = seconds(service["stop_grace_period"])
    assert service["stop_signal"] == image.one("STOPSIGNAL") == "SIGTERM"
    log = tmp_path / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            image.start_command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 180
        while (result := probe(image, env)).returncode != 0:
            assert process.poll() is None, f"exited {process.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"never healthy: {result.stderr}\n{log.read_text()}"
            time.sleep(0.5)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            cat = photo("chelsea.jpg")
            response = client.post("/v1/predict", files={"file": ("cat.jpg", cat)}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["classes"][0]["label"] in CAT_CLASSES
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=grace)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()
