"""``evalserve bench``: served throughput and latency against the in-process limit, in one run.

The limit is what the same model does with the same preprocessing in this process, at the
server's batch size, on the same device and threads, with no HTTP: decode + preprocessing of a
batch in the decode pool overlapping the previous batch's forward pass in the model's worker,
exactly the server's division of labour. The served numbers come from a load generator in this
process (async httpx, one connection per client, each client sending its next image as soon as
the last is answered), against a server it starts (or ``--url``). With ``--protocol grpc`` the
clients speak the gRPC Open Inference Protocol instead (one channel each, the JPEG as a BYTES
tensor, the top 5 as the classification output, the same work as ``/v1``'s default answer).
Over HTTP, a request whose connection is lost before any answer (reset or closed before the
response's head, never a timeout) is sent again at once, as ``app.client`` would, up to 3 times;
each level reports how many such resends it made, and its latency includes them.
Mean batch sizes, and the server's own count of the requests it answered, come from the
server's ``/metrics``.
Results go to a JSON file and a PNG plot.

With ``null_model`` the model is the null model (app/tools/null_model.py): a forward pass that
does next to nothing, with the decode and preprocessing of the model it stands in for, written
to a temporary model repository and served and measured exactly as any model. What it sustains
is the front end's limit (HTTP, JSON, decode, batching), the ceiling of every model.

This is a benchmark, not a test: its numbers depend on the machine and on what else runs on it.
Compare ratios within one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app import photos
from app.client import resendable
from app.config import Settings
from app.model.exported import available
from app.model.repository import discover
from app.model.runtime import choose_runtime, resolve_device
from app.preprocessing import ImageTransform, load_image, plan_device_decode
from app.values import EXPORTED_RUNTIMES, EncodedImage, Item, Precision, Runtime, TopK


def web_jpegs(size: tuple[int, int] = (500, 375), quality: int = 90) -> list[bytes]:
    """The shipped photographs (app/photos) re-encoded as typical web uploads."""
    images = []
    for name in photos.NAMES:
        with Image.open(photos.path(name)) as photo:
            image = photo.convert("RGB").resize(size, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        images.append(buffer.getvalue())
    return images


@dataclass
class Limit:
    batch_size: int
    images_per_s: float
    batch_ms: float
    single_image_ms: float = field(metadata={"doc": "decode + preprocess + forward of one image"})


@dataclass
class Level:
    concurrency: int
    requests: int
    errors: int
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch_size: float
    # Requests the server itself counted on the predict route during the level (any status, any
    # model): requests + errors, unless one never reached it, went uncounted, or (with --url)
    # came from another client. With several front-end processes (EVALSERVE_WORKERS), each
    # counts only its own requests: then the images the model process computed (one a request).
    server_requests: int
    fraction_of_limit: float = 0.0
    # Against the fastest runtime's in-process limit (the served one's unless --peer-limit).
    fraction_of_peer_limit: float = 0.0
    # Distinct transport errors of requests that failed for good (connection reset or closed
    # after the resends, or after the answer began), if any; each is also counted in ``errors``.
    connection_errors: list[str] = field(default_factory=list)
    # Requests sent again after a connection lost before any answer (HTTP only; see HttpClient).
    # A resent request counts once in ``requests``, its latency includes the lost attempts, and
    # the server counted an attempt in ``server_requests`` only if it had received it.
    retries: int = 0


def measure_limit(settings: Settings, model: str, images: list[bytes], seconds: float) -> Limit:
    """The in-process ceiling: the server's code and threads without HTTP."""
    from app.model.runtime import Classifier, resolve_device

    spec = discover(settings.model_repository, model)[model]
    classifier = Classifier(
        spec,
        resolve_device(settings.device),
        settings.torch_threads,
        settings.precision,
        settings.compile,
        settings.runtime,
        max_batch_size=settings.max_batch_size,
        max_image_pixels=settings.max_image_pixels,
    )
    transform = ImageTransform.from_spec(spec.preprocessing)
    size, top_k = settings.max_batch_size, min(settings.default_top_k, len(spec.labels))
    batch = [images[i % len(images)] for i in range(size)]
    on_device = classifier.device_decoder is not None

    def decode(data: bytes) -> np.ndarray | EncodedImage:
        # What the server's decode pool does: on a GPU, read the JPEG's header only.
        if on_device:
            planned = plan_device_decode(data, "bench", settings.max_image_pixels, transform)[1]
            if planned is not None:
                return planned
        return load_image(data, "bench", settings.max_image_pixels, transform)

    try:
        classifier.warm_up(size)
        with ThreadPoolExecutor(settings.decode_threads) as pool:

            def forward(arrays: list[np.ndarray | EncodedImage]) -> Future[list[TopK | Exception]]:
                items = [Item(a, top_k) for a in arrays]
                if classifier.stage_executor is None:
                    return classifier.submit(items)
                # On CUDA, as the batcher runs it: staged in the stage thread, then computed.
                staged = classifier.stage_executor.submit(classifier.stage, items)
                return classifier.executor.submit(lambda: classifier.compute(staged.result()))

            # One image end to end, as a lone client's request sees it (minus HTTP).
            singles = []
            for i in range(20):
                began = time.perf_counter()
                forward([decode(images[i % len(images)])]).result()
                singles.append(time.perf_counter() - began)
            # Batches, with the next batch's decoding overlapping this batch's forward pass (and
            # on CUDA its staging too: two batches in flight, as the batcher has them).
            pending = forward(list(pool.map(decode, batch)))
            batches, began = 0, time.perf_counter()
            while time.perf_counter() - began < seconds:
                arrays = list(pool.map(decode, batch))
                if classifier.stage_executor is not None:
                    pending, previous = forward(arrays), pending
                    previous.result()
                else:
                    pending.result()
                    pending = forward(arrays)
                batches += 1
            pending.result()
            elapsed = time.perf_counter() - began
    finally:
        classifier.close()
    return Limit(
        batch_size=size,
        images_per_s=batches * size / elapsed,
        batch_ms=1000 * elapsed / batches,
        single_image_ms=1000 * statistics.median(singles),
    )


# The route template the server's request counter labels the bench's predict requests with.
PREDICT_ROUTE = "/v1/models/{name}/predict"


@dataclass(frozen=True)
class ServerTotals:
    """Running totals from the server's /metrics at one moment."""

    batched_images: float  # evalserve_batch_size_sum of the model
    batches: float  # evalserve_batch_size_count of the model
    predict_requests: float  # evalserve_requests_total on PREDICT_ROUTE, POST, every status
    grpc_infers: float  # evalserve_grpc_requests_total of ModelInfer, every code
    # /metrics came from one of several front-end processes (evalserve_frontend_info): its HTTP
    # counters are that process's alone, its model figures the whole server's.
    front_end: bool = False


def server_totals(url: str, model: str) -> ServerTotals:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    batched_images = batches = predict_requests = grpc_infers = 0.0
    front_end = False
    for family in text_string_to_metric_families(text):
        front_end = front_end or family.name == "evalserve_frontend_info"
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            if name == "evalserve_batch_size_sum" and labels.get("model") == model:
                batched_images += sample.value
            elif name == "evalserve_batch_size_count" and labels.get("model") == model:
                batches += sample.value
            elif name == "evalserve_requests_total" and labels.get("route") == PREDICT_ROUTE:
                predict_requests += sample.value if labels.get("method") == "POST" else 0.0
            elif name == "evalserve_grpc_requests_total" and labels.get("method") == "ModelInfer":
                grpc_infers += sample.value
    return ServerTotals(batched_images, batches, predict_requests, grpc_infers, front_end)


class HttpClient:
    """One simulated client over HTTP: one connection, ``POST /v1/models/{model}/predict``.

    A request whose connection is lost before the response's head arrives is sent again at once
    (``app.client.resendable``: reset, closed or refused, not timed out), up to ``RETRIES`` times,
    and counted in ``retries``; a real client would resend it, and the server's failure stays
    visible in the count instead of in ``errors``."""

    RETRIES = 3

    def __init__(self, url: str, model: str, api_key: str | None) -> None:
        self.retries = 0
        self.headers = {"Content-Type": "image/jpeg"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.path = f"/v1/models/{model}/predict"
        self.client = httpx.AsyncClient(
            base_url=url, limits=httpx.Limits(max_connections=1), timeout=120
        )

    async def send(self, image: bytes) -> bool:
        """Whether the image was answered 200; raises ``ConnectionError`` when the connection
        failed without an answer after the resends, or while the answer was arriving."""
        attempt = 0
        while True:
            request = self.client.build_request(
                "POST", self.path, content=image, headers=self.headers
            )
            try:
                # stream=True returns once the head has arrived; what fails before it is resent.
                response = await self.client.send(request, stream=True)
            except httpx.TransportError as exc:
                if attempt < self.RETRIES and resendable(exc):
                    attempt += 1
                    self.retries += 1
                    continue
                raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
            try:
                await response.aread()
            except httpx.TransportError as exc:
                raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
            finally:
                await response.aclose()
            return response.status_code == 200

    async def close(self) -> None:
        await self.client.aclose()


class GrpcClient:
    """One simulated client over gRPC: one channel, ModelInfer with a BYTES tensor."""

    def __init__(self, target: str, model: str, api_key: str | None) -> None:
        import grpc

        from app.api.grpc import messages

        self.retries = 0  # never: an UNAVAILABLE call is counted in errors, not resent
        self.grpc = grpc
        self.messages = messages
        self.model = model
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.channel = grpc.aio.insecure_channel(target)
        self.infer = self.channel.unary_unary(
            f"/{messages.SERVICE}/ModelInfer",
            request_serializer=messages.ModelInferRequest.SerializeToString,
            response_deserializer=messages.ModelInferResponse.FromString,
        )

    async def send(self, image: bytes) -> bool:
        request = self.messages.ModelInferRequest(model_name=self.model)
        request.inputs.add(name="image", datatype="BYTES", shape=[1])
        request.outputs.add(name="probabilities").parameters["classification"].int64_param = 5
        request.raw_input_contents.append(len(image).to_bytes(4, "little") + image)
        try:
            await self.infer(request, metadata=self.metadata, timeout=120)
        except self.grpc.aio.AioRpcError as exc:
            if exc.code() == self.grpc.StatusCode.UNAVAILABLE and "shutting" not in (
                exc.details() or ""
            ):
                raise ConnectionError(f"UNAVAILABLE: {exc.details()}") from exc
            return False
        return True

    async def close(self) -> None:
        await self.channel.close()


async def drive(
    url: str,
    model: str,
    images: list[bytes],
    clients: int,
    seconds: float,
    api_key: str | None,
    grpc_target: str | None = None,
) -> Level:
    """One level: ``clients`` clients sending for ``seconds``, over HTTP, or over gRPC to
    ``grpc_target`` when given."""
    latencies: list[float] = []
    errors = 0
    dropped: set[str] = set()
    # One client (and connection) per simulated client: a shared pool of many connections
    # costs the load generator, on the server's cores, 2.3 times the CPU per request at 64
    # clients (measured over HTTP: 0.39 cores instead of 0.21), which the server lacked.
    pool: list[HttpClient | GrpcClient] = [
        GrpcClient(grpc_target, model, api_key) if grpc_target else HttpClient(url, model, api_key)
        for _ in range(clients)
    ]
    try:
        # Open every connection first, uncounted.
        await asyncio.gather(*(client.send(images[0]) for client in pool))
        retried_before = sum(client.retries for client in pool)
        before = server_totals(url, model)
        stop_at = time.perf_counter() + seconds

        async def one_client(offset: int) -> None:
            nonlocal errors
            client = pool[offset]
            i = offset
            while time.perf_counter() < stop_at:
                image, i = images[i % len(images)], i + 1
                began = time.perf_counter()
                try:
                    answered = await client.send(image)
                except ConnectionError as exc:
                    # Counted and reported, not fatal: a benchmark should say how often the
                    # server dropped a connection, not die on the first.
                    errors += 1
                    dropped.add(str(exc))
                    await asyncio.sleep(0.01)  # a dead server refuses at once: do not spin
                    continue
                if answered:
                    latencies.append(time.perf_counter() - began)
                else:
                    errors += 1

        began = time.perf_counter()
        await asyncio.gather(*(one_client(k) for k in range(clients)))
        elapsed = time.perf_counter() - began
        retries = sum(client.retries for client in pool) - retried_before
        after = server_totals(url, model)
    finally:
        await asyncio.gather(*(client.close() for client in pool))
    counted = (
        "grpc_infers"
        if grpc_target
        else "batched_images"
        if after.front_end
        else "predict_requests"
    )
    ordered = sorted(latencies) or [float("nan")]

    def percentile(p: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    batches = after.batches - before.batches
    batched = after.batched_images - before.batched_images
    return Level(
        concurrency=clients,
        requests=len(latencies),
        errors=errors,
        images_per_s=len(latencies) / elapsed,
        p50_ms=percentile(50),
        p90_ms=percentile(90),
        p99_ms=percentile(99),
        mean_batch_size=batched / batches if batches else 0.0,
        server_requests=round(getattr(after, counted) - getattr(before, counted)),
        connection_errors=sorted(dropped),
        retries=retries,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, "EVALSERVE_LOG_LEVEL": "warning", "EVALSERVE_GRPC_PORT": "0", **env},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited during start-up ({process.returncode})")
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not become ready")


def plot(result: dict[str, Any], path: Path) -> bool:
    """Throughput and p99 latency against concurrency; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    levels = result["served"]
    x = [level["concurrency"] for level in levels]
    figure, left = plt.subplots(figsize=(7, 4.2), dpi=120)
    left.plot(x, [level["images_per_s"] for level in levels], "o-", label="served images/s")
    left.axhline(result["limit"]["images_per_s"], ls="--", color="gray", label="in-process limit")
    left.set_xscale("log", base=2)
    left.set_xticks(x, [str(c) for c in x])
    left.set_xlabel("concurrent clients")
    left.set_ylabel("images/s")
    left.set_ylim(bottom=0)
    right = left.twinx()
    right.plot(x, [level["p99_ms"] for level in levels], "s:", color="tab:red", label="p99 ms")
    right.set_ylabel("p99 latency (ms)", color="tab:red")
    right.set_ylim(bottom=0)
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles=handles, loc="upper left", fontsize=8)
    left.set_title(
        f"evalserve {result['model']} ({_variant(result)}) on {result['device']}, "
        f"batch {result['limit']['batch_size']}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def run(
    *,
    model: str | None,
    url: str | None,
    concurrency: list[int],
    seconds: float,
    out: Path,
    precision: Precision | None,
    compile: bool | None = None,
    runtime: Runtime | None = None,
    peer_limit: bool = False,
    api_key: str | None = None,
    protocol: str = "http",
    grpc_target: str | None = None,
    null_model: bool = False,
) -> dict[str, Any]:
    """Benchmark a model over ``protocol`` (http or grpc; with ``url``, gRPC goes to
    ``grpc_target``, by default the URL's host on port 8001) and write JSON and a plot.

    With ``null_model``, benchmark the null model instead, with the preprocessing of ``model``
    (by default the default model): over ``url``, the server's model ``null``."""
    overrides: dict[str, Any] = {"precision": precision, "compile": compile, "runtime": runtime}
    # Only what was asked for: the rest (and an unset option) still comes from the environment.
    settings = Settings(**{key: value for key, value in overrides.items() if value is not None})
    model = model or settings.default_model
    with contextlib.ExitStack() as stack:
        stands_in_for = None
        if null_model:
            from app.tools import null_model as null

            # In a repository of its own, removed after the run (the limit, measured last,
            # loads it too).
            repository = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="evalserve-")))
            original = discover(settings.model_repository, model)[model]
            null.write_repository(repository, original)
            settings = settings.model_copy(
                update={"model_repository": repository, "default_model": null.NAME}
            )
            model, stands_in_for = null.NAME, model
        return _run(
            settings,
            model=model,
            stands_in_for=stands_in_for,
            url=url,
            concurrency=concurrency,
            seconds=seconds,
            out=out,
            precision=precision,
            compile=compile,
            peer_limit=peer_limit,
            api_key=api_key,
            protocol=protocol,
            grpc_target=grpc_target,
        )


def probe(url: str, model: str, image: bytes, api_key: str | None) -> dict[str, Any]:
    """The server's answer to one image, before the load: what the JSON reports it served."""
    headers = {"Content-Type": "image/jpeg"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    response = httpx.post(
        f"{url}/v1/models/{model}/predict", content=image, headers=headers, timeout=120
    )
    if response.status_code != 200:
        raise RuntimeError(
            f"the server at {url} did not answer an image for the model {model!r} "
            f"({response.status_code}: {response.text[:300]})"
        )
    answer: dict[str, Any] = response.json()
    return answer


def _run(
    settings: Settings,
    *,
    model: str,
    stands_in_for: str | None,
    url: str | None,
    concurrency: list[int],
    seconds: float,
    out: Path,
    precision: Precision | None,
    compile: bool | None,
    peer_limit: bool,
    api_key: str | None,
    protocol: str,
    grpc_target: str | None,
) -> dict[str, Any]:
    spec = discover(settings.model_repository, model)[model]
    served_runtime = choose_runtime(
        spec,
        resolve_device(settings.device),
        settings.runtime,
        settings.precision,
        settings.compile,
    )
    images = web_jpegs()
    process = None
    if url is None:
        env = {
            "EVALSERVE_MODEL_REPOSITORY": str(settings.model_repository.resolve()),
            "EVALSERVE_DEFAULT_MODEL": model,
            "EVALSERVE_RUNTIME": served_runtime,
        }
        if precision:
            env["EVALSERVE_PRECISION"] = precision
        if compile is not None:
            env["EVALSERVE_COMPILE"] = str(compile).lower()
        if protocol == "grpc":
            grpc_target = f"127.0.0.1:{free_port()}"
            env["EVALSERVE_GRPC_PORT"] = grpc_target.rsplit(":", 1)[1]
        process, url = start_server(env)
    elif protocol == "grpc" and grpc_target is None:
        grpc_target = f"{httpx.URL(url).host}:8001"
    try:
        answer = probe(url, model, images[0], api_key)
        served = [
            asyncio.run(
                drive(
                    url,
                    model,
                    images,
                    clients,
                    seconds,
                    api_key,
                    grpc_target if protocol == "grpc" else None,
                )
            )
            for clients in concurrency
        ]
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
    # Measured after the server stopped (when it was ours), so the two never share the cores.
    limit = measure_limit(settings, model, images, seconds)
    peers: dict[str, dict[str, Any]] = {}
    if peer_limit:
        # The same model and preprocessing on every other runtime installed here, fp32 eager:
        # what this machine can do at best, whatever evalserve serves.
        for other in ("torch", *EXPORTED_RUNTIMES):
            if other != served_runtime and available(other):
                fastest = settings.model_copy(
                    update={"runtime": other, "precision": "fp32", "compile": False}
                )
                peers[other] = asdict(measure_limit(fastest, model, images, seconds))
    peers[served_runtime] = asdict(limit)
    best = max(peers, key=lambda name: peers[name]["images_per_s"])
    for level in served:
        level.fraction_of_limit = level.images_per_s / limit.images_per_s
        level.fraction_of_peer_limit = level.images_per_s / peers[best]["images_per_s"]
    result: dict[str, Any] = {
        "model": model,
        "protocol": protocol,
        "runtime": served_runtime,
        "precision": settings.precision or spec.config.model.precision,
        "compiled": spec.config.model.compile if settings.compile is None else settings.compile,
        "device": str(resolve_device(settings.device)),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": __import__("torch").__version__,
        "url": url if process is None else "started by bench",
        "seconds_per_level": seconds,
        "settings": settings.model_dump(mode="json", exclude={"api_keys"}),
        # What the server answered to the first image (images[0]) before the load.
        "probe": answer,
        # The null model's run: the model whose decode and preprocessing it had.
        "null_model": {"stands_in_for": stands_in_for} if stands_in_for else None,
        "limit": asdict(limit),
        # In-process limits by runtime (with --peer-limit, every runtime installed here).
        "limits": peers,
        "peer_limit": {"runtime": best, **peers[best]} if peer_limit else None,
        "served": [asdict(level) for level in served],
    }
    out.mkdir(parents=True, exist_ok=True)
    compiled = "-compiled" if result["compiled"] else ""
    engine = "" if served_runtime == "torch" else f"-{served_runtime}"
    over = "" if protocol == "http" else f"-{protocol}"
    # The null model's results are named after the model it stands in for, apart from its own.
    name = f"null-model-{stands_in_for}" if stands_in_for else model
    stem = (
        f"{name}-{result['precision']}{compiled}{engine}{over}-{result['device'].replace(':', '')}"
    )
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    result["plot"] = str(out / f"{stem}.png") if plot(result, out / f"{stem}.png") else None
    result["json"] = str(out / f"{stem}.json")
    return result


def _variant(result: dict[str, Any]) -> str:
    parts = [result["precision"]]
    if result.get("compiled"):
        parts.append("compiled")
    if result.get("runtime", "torch") != "torch":
        parts.append(result["runtime"])
    return ", ".join(parts)


def format_result(result: dict[str, Any]) -> str:
    limit = result["limit"]
    null = result.get("null_model")
    lines = [
        *(
            [
                f"null model: a forward pass that does next to nothing (channel means), with "
                f"the decode and preprocessing of {null['stands_in_for']}: what the front end "
                "sustains (HTTP, JSON, decode, batching), the ceiling of any model"
            ]
            if null
            else []
        ),
        f"model {result['model']} ({_variant(result)}) on {result['device']}, "
        + ("over gRPC, " if result.get("protocol") == "grpc" else "")
        + f"{result['cpus']} CPUs",
        f"in-process limit: {limit['images_per_s']:.1f} images/s at batch {limit['batch_size']} "
        f"({limit['batch_ms']:.0f} ms a batch); one image alone {limit['single_image_ms']:.1f} ms",
    ]
    peer = result.get("peer_limit")
    if peer:
        others = ", ".join(
            f"{name} {limits['images_per_s']:.1f}" for name, limits in result["limits"].items()
        )
        lines.append(
            f"peer limit: {peer['images_per_s']:.1f} images/s ({peer['runtime']}, the fastest "
            f"runtime here in process: {others})"
        )
    lines.append(
        f"{'clients':>8} {'images/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'batch':>6} {'of limit':>9}" + (f" {'of peer':>8}" if peer else "") + f" {'errors':>7}"
    )
    for level in result["served"]:
        of_peer = f" {level['fraction_of_peer_limit']:>8.0%}" if peer else ""
        lines.append(
            f"{level['concurrency']:>8} {level['images_per_s']:>9.1f} {level['p50_ms']:>8.1f} "
            f"{level['p90_ms']:>8.1f} {level['p99_ms']:>8.1f} {level['mean_batch_size']:>6.1f} "
            f"{level['fraction_of_limit']:>9.0%}{of_peer} {level['errors']:>7}"
        )
    for level in result["served"]:
        if level.get("retries"):
            lines.append(
                f"  {level['concurrency']} clients: {level['retries']} requests sent again after "
                "a connection lost before an answer"
            )
        for error in level.get("connection_errors", []):
            lines.append(f"  {level['concurrency']} clients, connection error: {error}")
    plotted = f", plot: {result['plot']}" if result["plot"] else " (no plot: install matplotlib)"
    lines.append(f"results: {result['json']}{plotted}")
    return "\n".join(lines)
