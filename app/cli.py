"""``evalserve`` command line: ``evalserve serve`` (the default) starts the HTTP server."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import ValidationError

from app.config import Settings
from app.repository import ModelConfigError, discover

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _serve_parser(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="start the HTTP server (the default command)",
        description="Start the HTTP server. Options override EVALSERVE_* environment variables.",
    )
    serve.add_argument("--host", help="address to bind (EVALSERVE_HOST)")
    serve.add_argument("--port", type=int, help="port to bind (EVALSERVE_PORT)")
    serve.add_argument("--model-repository", help="folder of models (EVALSERVE_MODEL_REPOSITORY)")
    serve.add_argument("--default-model", help="model of /v1/predict (EVALSERVE_DEFAULT_MODEL)")
    serve.add_argument("--device", help="auto, cpu, cuda or cuda:N (EVALSERVE_DEVICE)")
    serve.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (EVALSERVE_LOG_LEVEL)",
    )


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key: value
        for key in ("host", "port", "model_repository", "default_model", "device", "log_level")
        if (value := getattr(args, key, None)) is not None
    }
    return Settings(**overrides)


def serve(settings: Settings) -> int:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises SIGTERM/SIGINT once it has shut down, so even a clean drain
            # would end with status 143. A replica told to stop that stopped cleanly exits 0.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in _STOP_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    from app.main import create_app

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Check the repository's files before anything heavy, so a typo fails in one line.
    try:
        discover(settings.model_repository)
    except ModelConfigError as exc:
        print(f"evalserve: cannot start: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(settings.request_timeout_s),
    )
    server = Server(config)
    server.run()
    # uvicorn returns (rather than raising) when the lifespan fails, e.g. a model that won't load.
    return 0 if server.started else 3


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="evalserve", description="Inference REST microservice for PyTorch image classifiers."
    )
    subparsers = parser.add_subparsers(dest="command")
    _serve_parser(subparsers)
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or (arguments[0].startswith("-") and arguments[0] not in ("-h", "--help")):
        arguments.insert(0, "serve")  # serving is the default command
    args = parser.parse_args(arguments)
    try:
        settings = _settings(args)
    except ValidationError as exc:
        print(f"evalserve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return serve(settings)
    parser.print_help()
    return 2
