"""evalserve as a Ray Serve application: one deployment whose ASGI ingress is
``create_app(settings)``, so every replica is a whole evalserve (its batcher, metrics, probes).

    serve run deploy.ray.serve_evalserve:app                          # settings from EVALSERVE_*
    serve run deploy.ray.serve_evalserve:app device=cuda max_batch_size=32   # or key=value
    python -m deploy.ray.serve_evalserve --port 8000 device=cpu       # a local Ray, Ctrl-C stops

``app`` is a Serve application builder: Serve calls it with the ``key=value`` arguments, which
override the ``EVALSERVE_*`` environment of the process that runs it (see Configuration in the
README). The settings are checked there, before Ray starts anything, then travel to every replica
with the deployment, where Ray Serve runs the app's lifespan (uvicorn's ``LifespanOn``) before
the replica takes traffic: the models load and warm up inside the replica.

Ray Serve's proxy serves HTTP, so ``host`` and ``port`` do not apply, and evalserve's own gRPC
port stays off (``grpc_port=0``): several replicas on one node would fight over it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from app import logs
from app.config import Settings
from app.main import create_app

# Per replica: the model's worker thread and the decode threads. Ray sets OMP_NUM_THREADS to
# num_cpus in the replica, so torch uses that many intra-op threads unless torch_threads is set.
NUM_CPUS = 2
# Images in flight per replica at which Serve adds one: the README's Autoscaling section found
# that throughput barely grows past 16 in flight (a full batch waiting behind the one computing).
TARGET_ONGOING_REQUESTS = 16

DEPLOYMENT_OPTIONS: dict[str, Any] = {
    "name": "evalserve",
    "ray_actor_options": {"num_cpus": NUM_CPUS},
    # Serve's default of 5 requests at a time would keep a replica's batches at 5 images or
    # fewer; twice the target lets one batch fill while another computes.
    "max_ongoing_requests": 2 * TARGET_ONGOING_REQUESTS,
    # Beyond this many waiting in Serve's router, clients get 503 at once rather than a hang.
    "max_queued_requests": 256,
    "autoscaling_config": {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": TARGET_ONGOING_REQUESTS,
    },
    # Serve stops routing to a replica it stops, so only accepted requests need time: at most
    # request_timeout_s (30 s by default) each, then the lifespan drains the batchers.
    "graceful_shutdown_timeout_s": 45,
    "health_check_period_s": 10,
}


def ray_settings(args: dict[str, Any]) -> Settings:
    """The replicas' settings: the environment here, overridden by ``args``; no gRPC port."""
    asked = args.get("grpc_port", os.environ.get("EVALSERVE_GRPC_PORT", "0"))
    if int(asked) != 0:
        raise ValueError(
            f"grpc_port={asked}: it must be 0 under Ray Serve, whose proxy serves HTTP; replicas "
            "sharing a node would clash on evalserve's own gRPC port"
        )
    settings = Settings(**{**args, "grpc_port": 0})
    # Replicas may start in another working directory; a relative path would not follow them.
    return settings.model_copy(update={"model_repository": settings.model_repository.resolve()})


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder: ``args`` are evalserve settings (``device=cuda``, ...)."""
    settings = ray_settings(args)

    def evalserve_asgi_app() -> FastAPI:
        # Called in each replica; the models load in the lifespan Serve runs there.
        _log_to_stderr(settings)
        return create_app(settings)

    class EvalServe:
        # Provided by Serve's ASGI wrapper once the replica has built the app.
        app: FastAPI

        def check_health(self) -> None:
            """Serve replaces a replica whose check fails: a dead batch loop cannot recover."""
            failure = self.app.state.lifecycle.failure
            if failure is not None:
                raise RuntimeError(f"evalserve stopped serving: {failure}")

    # The decorators, applied as calls so that type checkers see the Deployment they return.
    ingress = serve.ingress(evalserve_asgi_app)(EvalServe)
    return serve.deployment(**DEPLOYMENT_OPTIONS)(ingress).bind()


# `serve run deploy.ray.serve_evalserve:app key=value ...` calls the builder with the pairs.
app = build_app


def _log_to_stderr(settings: Settings) -> None:
    """evalserve's log lines on the replica's stderr (Ray keeps it in the replica's log and
    streams it to the driver), leaving the root logger to Ray."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logs.JsonFormatter()
        if settings.log_format == "json"
        else logging.Formatter(logs.TEXT_FORMAT)
    )
    logger = logging.getLogger("evalserve")
    logger.handlers[:] = [handler]
    logger.setLevel(settings.log_level.upper())
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.ray.serve_evalserve",
        description="Run evalserve on Ray Serve until Ctrl-C or SIGTERM, then shut Serve down.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address Serve's proxy binds")
    parser.add_argument("--port", type=int, default=8000, help="port Serve's proxy binds")
    parser.add_argument(
        "--address", default=None, help="a running Ray cluster (default: start a local one)"
    )
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="evalserve settings")
    options = parser.parse_args(argv)
    pairs = [item.partition("=") for item in options.settings]
    if any(not sep or not key for key, sep, _ in pairs):
        parser.error("settings are KEY=VALUE, such as device=cpu")
    # Checked before Ray starts: a bad setting fails in a second, not after a cluster start.
    try:
        application = build_app({key: value for key, _, value in pairs})
    except ValueError as exc:  # pydantic's ValidationError included
        parser.error(str(exc))
    ray.init(address=options.address)
    # SIGTERM stops like Ctrl-C, so Serve and the local Ray it started are shut down too. Set
    # after ray.init, which installs a handler of its own that dumps a stack and aborts.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        serve.run(application, blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
