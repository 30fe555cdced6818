"""Shared test helpers (imported as ``support``): the committed photographs, and Settings
pointed at the real model repository."""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from playwright.sync_api import Browser

    from app.model.runtime import Classifier
    from app.preprocessing import ImageTransform
    from app.state import ServedModel
    from app.values import EncodedImage

ROOT = Path(__file__).resolve().parents[1]
# The JPEG photographs ship with evalserve (bench and agreement use them); the PNGs are tests'.
PHOTO_DIR = ROOT / "app" / "photos"
FIXTURES = ROOT / "tests" / "fixtures"
MODELS = ROOT / "models"
DEFAULT_MODEL = "efficientnet_lite0"
CAT_CLASSES = {"Egyptian cat", "tabby", "tiger cat"}
COFFEE_CLASSES = {"espresso", "cup"}
PHOTOS = [
    "chelsea.jpg",
    "coffee.jpg",
    "rocket.jpg",
    "astronaut.jpg",
    "motorcycle.jpg",
    "retina.jpg",
    "hubble.jpg",
    "camera.jpg",
]


def fixture(name: str) -> Path:
    """A committed photograph by file name: ``chelsea.jpg`` (shipped) or ``chelsea.png``."""
    return (PHOTO_DIR if name.endswith(".jpg") else FIXTURES) / name


def classifier_of(model: ServedModel) -> Classifier:
    """The torch side of a served model (the routes only see its plain ``Runner`` face)."""
    from app.model.runtime import Classifier

    assert isinstance(model.classifier, Classifier)
    return model.classifier


def photo(name: str) -> bytes:
    return fixture(name).read_bytes()


def make_settings(**overrides: Any) -> Settings:
    """Settings for a test server: the real repository, CPU unless a test asks otherwise."""
    # No gRPC port unless a test asks: tests run servers side by side.
    values: dict[str, Any] = {
        "model_repository": MODELS,
        "device": "cpu",
        "torch_threads": 2,
        "grpc_port": 0,
    }
    values.update(overrides)
    return Settings(**values)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data: a bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def jpeg_of(image: Any, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **save)
    return buffer.getvalue()


def web_jpeg(name: str, **save: Any) -> bytes:
    """A shipped photograph re-encoded as a typical web upload (RGB JPEG, quality 90)."""
    from PIL import Image

    with Image.open(io.BytesIO(photo(name))) as image:
        return jpeg_of(image.convert("RGB"), **{"quality": 90, **save})


def device_jpeg(data: bytes, transform: ImageTransform, name: str = "upload.jpg") -> EncodedImage:
    """``data`` as the request path hands it to a model that decodes JPEGs on its device."""
    from app.preprocessing import plan_device_decode

    planned = plan_device_decode(data, name, 40_000_000, transform)[1]
    assert planned is not None, f"{name} would be decoded on the CPU"
    return planned


def digits_trainer():
    """models/digits/train.py as a module (it is a script, not part of the package)."""
    import importlib.util
    import sys

    name = "evalserve_digits_train"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, MODELS / "digits" / "train.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@contextmanager
def live_server(**overrides: Any) -> Iterator[tuple[str, FastAPI]]:
    """A real uvicorn server on 127.0.0.1, in a thread of this process, so a test can reach the
    app's state. Yields its URL and the app."""
    import socket
    import threading
    import time

    import uvicorn

    from app.main import create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(make_settings(**overrides))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 180
        while not server.started:
            assert thread.is_alive(), "the server failed to start"
            assert time.monotonic() < deadline, "the server did not start in time"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=60)


class ServerProcess:
    """``python -m app serve`` in a subprocess on a free port of 127.0.0.1. Its output goes to a
    file, not a pipe: a pipe nobody reads fills up with access-log lines and stalls the server.
    ``launcher``, a Python file that ends by calling ``app.tools.cli.main(sys.argv[1:])``, runs
    instead of ``-m app`` (to start a server with a fault injected first)."""

    def __init__(
        self, log: Path, *args: str, launcher: Path | str | None = None, **env: str
    ) -> None:
        import os
        import socket
        import subprocess
        import sys

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        program = [str(launcher)] if launcher is not None else ["-m", "app"]
        command = [sys.executable, *program, "serve", "--host", "127.0.0.1"]
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port), *args],
                cwd=ROOT,
                env={**os.environ, "EVALSERVE_DEVICE": "cpu", "EVALSERVE_GRPC_PORT": "0", **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait_ready(self, timeout: float = 180.0) -> None:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"the server exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"the server is not ready:\n{self.output()}"
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def memory(self, field: str = "VmRSS") -> int:
        """A memory figure of the server process from /proc (VmRSS, VmHWM, ...), in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                value, unit = line.split()[1:3]
                assert unit == "kB", line
                return int(value) * 1024
        raise AssertionError(f"{field} not in /proc/{self.process.pid}/status")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (if still running), then its exit status; killed if it outlasts ``timeout``."""
        import signal
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def wait_exit(self, timeout: float = 180.0) -> int:
        return self.process.wait(timeout=timeout)


@contextmanager
def ready_server(log: Path, *args: str, **env: str) -> Iterator[ServerProcess]:
    """A ready server whose stopping the test itself controls (and checks); killed if the test
    left it running."""
    server = ServerProcess(log, *args, **env)
    try:
        server.wait_ready()
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
        server.process.wait()


@contextmanager
def running_server(log: Path, *args: str, **env: str) -> Iterator[ServerProcess]:
    """A ready server; on exit it is stopped with SIGTERM and must have exited 0, cleanly."""
    server = ServerProcess(log, *args, **env)
    try:
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
    assert code == 0, server.output()
    assert "Traceback" not in server.output(), server.output()


def metric(text: str, sample: str, **labels: str) -> float:
    """One sample's value from a Prometheus text exposition; exactly one must match."""
    from prometheus_client.parser import text_string_to_metric_families

    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and s.labels == labels
    ]
    assert len(found) == 1, f"{sample}{labels}: {found}"
    return found[0]


# Debian's Chromium as root in a container with the network closed: no sandbox, no background
# fetches (each would be refused, many at a time).
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@contextmanager
def chromium(*extra_args: str) -> Iterator[Browser]:
    """Debian's Chromium driven by Playwright (no browser download: `make test` installs it)."""
    import shutil

    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(executable).exists(), "Debian's chromium is not installed (make test installs it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, args=[*CHROMIUM_ARGS, *extra_args]
        )
        try:
            yield browser
        finally:
            browser.close()
