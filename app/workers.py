"""``EVALSERVE_WORKERS=N`` (N > 1): N HTTP front-end processes and the one process that runs
the models.

The process ``evalserve serve`` starts (the model process) binds the port, loads and warms the
models, runs their batchers and the gRPC server, and serves the hand-off (``app.handoff``) on a
Unix socket in a private temporary folder. It serves no HTTP itself: its event loop is left to
the batchers and the hand-off. Then it starts N front-ends, each a fresh interpreter (never a
fork: the model process may hold CUDA state), in a session of its own (so Ctrl-C in a terminal
reaches the model process only, which stops them in order), handing each the listening socket
and a shared-memory slab of its own. A front-end runs the usual app (every route, middleware,
error, probe and the access log) under the usual ``DrainingServer``, with models whose batchers
are ``app.handoff.RemoteBatcher``; it never imports torch.

Stopping: on SIGTERM (or Ctrl-C) the model process turns not ready (gRPC), sends SIGTERM to
every front-end, which drains as a single server does (readiness 503, requests in flight
answered, the port emptied), waits for them, answers the gRPC calls in flight, then stops its
batchers and exits 0. A front-end that exits on its own, or a model's batch loop that dies,
stops the whole server the same way, exiting 1, so the process manager restarts it. A front-end
whose model process is gone exits 1 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import Any

from app import logs
from app.config import Settings
from app.handoff import (
    FrontendMetrics,
    HandoffServer,
    create_slab,
    map_slab,
    metrics_router,
    open_remote_models,
)
from app.handoff import slab_size as slab_size_for
from app.lifecycle import Lifecycle
from app.main import create_app
from app.metrics import Metrics
from app.state import Serving

logger = logging.getLogger("evalserve")
# What a front-end runs: the settings arrive on its standard input, not in its arguments.
_FRONTEND = "from app.workers import frontend_main; raise SystemExit(frontend_main())"


def refusal(settings: Settings) -> str | None:
    """Why the server cannot run with ``settings.workers`` front-ends, or None."""
    if settings.model_control:
        return (
            "EVALSERVE_MODEL_CONTROL=true needs EVALSERVE_WORKERS=1: models cannot yet be "
            "loaded or unloaded while several front-end processes serve them"
        )
    if not hasattr(os, "memfd_create"):
        return "EVALSERVE_WORKERS above 1 needs Linux (shared memory through memfd)"
    return None


def frontend_settings(settings: Settings) -> dict[str, Any]:
    """``settings`` as a front-end gets them: as JSON values, the API keys included, and no
    gRPC (it stays in the model process)."""
    values = settings.model_dump(mode="json", exclude={"api_keys"})
    values["api_keys"] = (
        settings.api_keys.get_secret_value() if settings.api_keys is not None else None
    )
    values["grpc_port"] = 0
    return values


def run_owner(settings: Settings, sock: socket.socket) -> int:
    """The model process: serve until stopped (see the module's docstring); the exit codes of
    ``app.server.run``."""
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover (a dependency on Linux)
        runner = asyncio.Runner()
    try:
        with runner:
            return runner.run(_Owner(settings, sock).run())
    finally:
        sock.close()


class _Owner:
    def __init__(self, settings: Settings, sock: socket.socket) -> None:
        self.settings = settings
        self.sock = sock
        self.stop = asyncio.Event()
        self.signals = 0
        self.frontends: list[asyncio.subprocess.Process] = []

    def _signal(self, sig: signal.Signals) -> None:
        self.signals += 1
        if self.signals == 1:
            logger.info("received %s: draining %d front-end(s)", sig.name, len(self.frontends))
            self.stop.set()
            return
        logger.warning("received %s again: stopping the front-ends now", sig.name)
        for process in self.frontends:
            if process.returncode is None:
                process.kill()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._signal, sig)
        # The model side of the usual app: its lifespan loads the models and runs gRPC; its
        # routes are never served here.
        app = create_app(self.settings)
        lifecycle: Lifecycle = app.state.lifecycle
        lifecycle.on_failure(lambda _reason: self.stop.set())
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(app.router.lifespan_context(app))
            except Exception:
                return 3  # logged in one line by the lifespan
            if self.stop.is_set():  # stopped while loading
                return 0 if lifecycle.failure is None else 1
            serving: Serving = app.state.serving
            metrics: Metrics = app.state.metrics
            code = await self._serve(serving, metrics, lifecycle)
        return 1 if lifecycle.failure is not None else code

    async def _serve(self, serving: Serving, metrics: Metrics, lifecycle: Lifecycle) -> int:
        settings = self.settings
        folder = tempfile.mkdtemp(prefix="evalserve-")
        path = os.path.join(folder, "handoff.sock")
        size = slab_size_for(settings, [model.facts for model in serving.models.values()])
        slabs, fds = {}, {}
        for index in range(settings.workers):
            fds[index], slabs[index] = create_slab(size)
        handoff = HandoffServer(serving, slabs, metrics.render)
        await handoff.start(path)
        code = 0
        try:
            for index in range(settings.workers):
                self.frontends.append(await self._start(index, path, fds[index], size))
            for fd in fds.values():
                os.close(fd)
            # The front-ends hold the port now; closing it is theirs, after their drain.
            host, port = self.sock.getsockname()[:2]
            self.sock.close()
            logger.info(
                "listening on http://%s:%d: %d front-end processes (pids %s), %d MiB of shared "
                "memory each at most",
                host,
                port,
                len(self.frontends),
                ", ".join(str(process.pid) for process in self.frontends),
                size >> 20,
            )
            exits = {asyncio.ensure_future(process.wait()): process for process in self.frontends}
            stopping = asyncio.ensure_future(self.stop.wait())
            done, _ = await asyncio.wait({stopping, *exits}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            for task in done & set(exits):
                process = exits[task]
                lifecycle.fail(
                    f"front-end process {process.pid} exited with status {process.returncode}"
                )
            code = await self._stop_frontends(lifecycle)
            # The gRPC calls still in flight, now that every front-end is done.
            await lifecycle.drain(0.0, settings.drain_timeout_s)
        finally:
            for process in self.frontends:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await handoff.close()
            shutil.rmtree(folder, ignore_errors=True)
        return code

    async def _start(self, index: int, path: str, slab_fd: int, size: int) -> Any:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _FRONTEND,
            stdin=asyncio.subprocess.PIPE,
            pass_fds=(self.sock.fileno(), slab_fd),
            start_new_session=True,
        )
        assert process.stdin is not None
        process.stdin.write(
            json.dumps(
                {
                    "settings": frontend_settings(self.settings),
                    "socket": path,
                    "index": index,
                    "listen_fd": self.sock.fileno(),
                    "slab_fd": slab_fd,
                    "slab_size": size,
                }
            ).encode()
        )
        await process.stdin.drain()
        process.stdin.close()
        return process

    async def _stop_frontends(self, lifecycle: Lifecycle) -> int:
        """SIGTERM every front-end still running and wait for their drains: 0 when each exited
        0, else 1."""
        lifecycle.draining = True
        for process in self.frontends:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        settings = self.settings
        limit = settings.drain_delay_s + settings.drain_timeout_s + settings.request_timeout_s
        try:
            async with asyncio.timeout(limit + 10.0):
                await asyncio.gather(*(process.wait() for process in self.frontends))
        except TimeoutError:
            logger.error("front-ends still running %.0f s after SIGTERM: killed", limit + 10.0)
            return 1
        failed = [p for p in self.frontends if p.returncode != 0]
        for process in failed:
            logger.error("front-end %d exited with status %s", process.pid, process.returncode)
        return 1 if failed else 0


def frontend_main() -> int:
    """A front-end process (started by the model process; its configuration on stdin)."""
    config = json.loads(sys.stdin.read())
    settings = Settings(**config["settings"])
    logs.configure(settings.log_level, settings.log_format)
    sock = socket.socket(fileno=config["listen_fd"])
    slab = map_slab(config["slab_fd"], config["slab_size"])
    os.close(config["slab_fd"])
    index = config["index"]
    metrics = FrontendMetrics(index)
    app = create_app(
        settings,
        open_models=open_remote_models(config["socket"], index, slab),
        metrics=metrics,
        routers=[metrics_router(metrics)],
    )
    from app.server import serve

    return serve(app, settings, sock)
