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

ROOT = Path(__file__).resolve().parents[1]
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


def photo(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def make_settings(**overrides: Any) -> Settings:
    """Settings for a test server: the real repository, CPU unless a test asks otherwise."""
    values: dict[str, Any] = {"model_repository": MODELS, "device": "cpu", "torch_threads": 2}
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


def digits_trainer():
    """models/digits/train.py as a module (it is a script, not part of the package)."""
    import importlib.util
    import sys

    name = "evalserve_digits_train"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, MODELS / "digits" / "train.py")
        assert spec is not None and spec.loader is not None
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
