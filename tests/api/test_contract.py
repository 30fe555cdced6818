"""The evaluation contract of a served model, in process: eval mode, inference mode in the worker
thread, no leakage between requests in a batch, and what overload, deadlines and failures do.

Concurrency needs the lifespan and an async client: ``LifespanManager`` + ``httpx.AsyncClient``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import torch
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.types import Message
from support import CAT_CLASSES, PHOTOS, classifier_of, make_settings, photo

from app.main import create_app
from app.state import ServedModel, Serving


@asynccontextmanager
async def served(**overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Serving]]:
    app = create_app(make_settings(**overrides))
    async with LifespanManager(app, startup_timeout=120):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, app.state.serving


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


async def predict(client: httpx.AsyncClient, name: str, top_k: int = 1000) -> httpx.Response:
    return await client.post(f"/v1/predict?top_k={top_k}", files={"file": (name, photo(name))})


def score_vector(response: httpx.Response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    scores = torch.zeros(1000)
    for entry in response.json()["predictions"][0]["classes"]:
        scores[entry["index"]] = entry["score"]
    return scores


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


class BlockedWorker:
    """Occupies a model's single worker thread so batches queue up behind it."""

    def __init__(self, model: ServedModel) -> None:
        self._gate = threading.Event()
        self._job = model.classifier.executor.submit(self._gate.wait, 30)

    def release(self) -> None:
        self._gate.set()
        self._job.result()


def test_every_module_of_a_served_model_is_in_eval_mode() -> None:
    with TestClient(create_app(make_settings())) as client:
        serving: Serving = client.app.state.serving  # type: ignore[attr-defined]
        for model in serving.models.values():
            modules = list(classifier_of(model).module.modules())
            assert len(modules) > 10
            assert [m for m in modules if m.training] == []
            assert all(not p.requires_grad for p in classifier_of(model).module.parameters())
        # The default model's 49 BatchNorms were folded into its convolutions with their
        # running statistics, which fold_batchnorm refuses to do for a model in train mode.
        default = classifier_of(serving.default_model)
        assert default.folded_batchnorms == 49
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in default.module.modules())


def test_forward_runs_in_inference_mode_in_the_worker_thread() -> None:
    seen: list[tuple[int, bool, bool]] = []

    def record(_module: torch.nn.Module, _inputs: Any) -> None:
        seen.append(
            (threading.get_ident(), torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        )

    with TestClient(create_app(make_settings(runtime="torch"))) as client:
        model = client.app.state.serving.default_model  # type: ignore[attr-defined]
        handle = classifier_of(model).module.register_forward_pre_hook(record)
        try:
            response = client.post("/v1/predict", files={"file": photo("chelsea.jpg")})
        finally:
            handle.remove()
        assert response.status_code == 200
        worker = model.classifier.worker_thread_id
    assert worker is not None
    assert worker != threading.get_ident()
    assert seen == [(worker, True, False)]


def test_an_exported_runtime_runs_in_the_worker_thread() -> None:
    """ONNX Runtime has no inference mode to check: the contract is that it runs in the model's
    own worker thread, like torch (and that it computes torch's logits, test_runtimes.py)."""
    with TestClient(create_app(make_settings(runtime="onnxruntime"))) as client:
        classifier = classifier_of(client.app.state.serving.default_model)  # type: ignore[attr-defined]
        forward = classifier._exported
        assert forward is not None
        threads: list[int] = []

        def recorded(batch: torch.Tensor) -> torch.Tensor:
            threads.append(threading.get_ident())
            return forward(batch)

        classifier._exported = recorded
        response = client.post("/v1/predict", files={"file": photo("chelsea.jpg")})
        assert response.status_code == 200
    assert threads == [classifier.worker_thread_id]
    assert threads[0] != threading.get_ident()


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "openvino"])
def test_concurrent_requests_batch_together_without_changing_scores(runtime: str) -> None:
    """8 different photos at once get the scores they get one by one, in a batch larger than 1."""

    async def scenario() -> None:
        async with served(max_batch_delay_ms=200, runtime=runtime) as (client, serving):
            stats = serving.default_model.batcher.stats
            alone = []
            for name in PHOTOS:
                alone.append(score_vector(await predict(client, name)))
            assert stats.largest_batch == 1  # sequential requests were computed alone
            together = await asyncio.gather(*(predict(client, name) for name in PHOTOS))
            assert stats.largest_batch > 1
            for name, single, batched in zip(PHOTOS, alone, together, strict=True):
                batched_scores = score_vector(batched)
                assert torch.allclose(batched_scores, single, atol=1e-5, rtol=0), (
                    f"{name}: {(batched_scores - single).abs().max().item():.2e}"
                )
                assert batched_scores.argmax() == single.argmax()
            # The photos are different, so a leak would show: their answers differ.
            assert len({int(score_vector(r).argmax()) for r in together}) >= 6

    run(scenario)


def test_full_queue_answers_503_with_retry_after_and_no_500() -> None:
    async def scenario() -> None:
        async with served(max_batch_size=1, max_queue_size=2, max_batch_delay_ms=0) as (
            client,
            serving,
        ):
            model = serving.default_model
            blocked = BlockedWorker(model)
            first = asyncio.create_task(predict(client, "chelsea.jpg", top_k=1))
            # The loop takes the first image into a batch that waits for the worker ...
            await until(lambda: model.batcher.in_flight == 1)
            queued = [asyncio.create_task(predict(client, "coffee.jpg", top_k=1)) for _ in range(2)]
            # ... and the next two fill the queue.
            await until(lambda: model.batcher.depth == 2)
            rejected = await asyncio.gather(
                *(predict(client, "rocket.jpg", top_k=1) for _ in range(5))
            )
            for response in rejected:
                assert response.status_code == 503, response.text
                assert response.headers["Retry-After"] == "1"
                assert response.json()["error"]["code"] == "overloaded"
            blocked.release()
            answered = await asyncio.gather(first, *queued)
            assert [r.status_code for r in answered] == [200, 200, 200]
            assert (await predict(client, "chelsea.jpg", top_k=1)).status_code == 200
            assert (await client.get("/health/ready")).status_code == 200

    run(scenario)


def test_request_past_its_deadline_gets_504_and_is_not_computed() -> None:
    async def scenario() -> None:
        async with served(request_timeout_s=0.3, max_batch_size=1) as (client, serving):
            model = serving.default_model
            blocked = BlockedWorker(model)
            occupying = asyncio.create_task(predict(client, "chelsea.jpg", top_k=1))
            await until(lambda: model.batcher.in_flight == 1)
            late = await predict(client, "coffee.jpg", top_k=1)
            assert late.status_code == 504, late.text
            assert late.json()["error"]["code"] == "timeout"
            blocked.release()
            await occupying
            await until(lambda: model.batcher.depth == 0)
            after = await predict(client, "chelsea.jpg", top_k=1)
            assert after.status_code == 200
            # The occupying image was already in a batch, so it ran (its client had timed out
            # too); the late one was still queued, so it was dropped: 2 images, not 3.
            assert model.batcher.stats.items == 2

    run(scenario)


def test_failing_forward_pass_fails_only_its_batch() -> None:
    async def scenario() -> None:
        async with served(runtime="torch") as (client, serving):
            module = classifier_of(serving.default_model).module
            calls = {"n": 0}

            def fail_once(_module: torch.nn.Module, _inputs: Any) -> None:
                calls["n"] += 1
                if calls["n"] == 1:
                    raise RuntimeError("CUDA error: an illegal memory access (injected)")

            handle = module.register_forward_pre_hook(fail_once)
            try:
                failed = await predict(client, "chelsea.jpg", top_k=1)
                assert failed.status_code == 500
                error = failed.json()["error"]
                assert error["code"] == "inference_failed"
                # No internals reach the client.
                assert "RuntimeError" not in failed.text
                assert "CUDA" not in failed.text
                recovered = await predict(client, "chelsea.jpg", top_k=1)
                assert recovered.status_code == 200
                assert recovered.json()["predictions"][0]["classes"][0]["label"] in CAT_CLASSES
            finally:
                handle.remove()
            assert serving.default_model.batcher.stats.failed_batches == 1

    run(scenario)


def test_client_that_disconnects_has_its_queued_image_dropped() -> None:
    """Drive the ASGI app directly: the body arrives, then the client goes away while queued."""

    async def scenario() -> None:
        app: FastAPI = create_app(make_settings(max_batch_size=1))
        async with LifespanManager(app, startup_timeout=120):
            model = app.state.serving.default_model
            blocked = BlockedWorker(model)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                occupying = asyncio.create_task(predict(client, "chelsea.jpg", top_k=1))
                await until(lambda: model.batcher.in_flight == 1)

                gone = asyncio.Event()
                body = photo("coffee.jpg")
                messages: list[Message] = [
                    {"type": "http.request", "body": body, "more_body": False}
                ]
                sent: list[Message] = []

                async def receive() -> Message:
                    if messages:
                        return messages.pop(0)
                    await gone.wait()
                    return {"type": "http.disconnect"}

                async def send(message: Message) -> None:
                    sent.append(message)

                scope = {
                    "type": "http",
                    "asgi": {"version": "3.0"},
                    "http_version": "1.1",
                    "method": "POST",
                    "scheme": "http",
                    "path": "/v1/predict",
                    "raw_path": b"/v1/predict",
                    "root_path": "",
                    "query_string": b"top_k=1",
                    "headers": [
                        (b"host", b"t"),
                        (b"content-type", b"image/jpeg"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                    "client": ("127.0.0.1", 50000),
                    "server": ("127.0.0.1", 80),
                    "state": {},
                }
                call = asyncio.create_task(app(scope, receive, send))
                await until(lambda: model.batcher.depth == 1)
                gone.set()
                await call
                blocked.release()
                assert (await occupying).status_code == 200
                await until(lambda: model.batcher.depth == 0)
                # Only the occupying request's image was computed; the abandoned one never was.
                assert model.batcher.stats.items == 1

    run(scenario)


@pytest.mark.cuda
def test_cuda_serving_matches_cpu_scores() -> None:
    async def scenario() -> None:
        async with served(device="cpu") as (cpu_client, _):
            # A PNG: decoded on the CPU for both (a JPEG would be decoded on the GPU).
            expected = score_vector(await predict(cpu_client, "chelsea.png"))
        async with served(device="cuda") as (client, serving):
            assert str(classifier_of(serving.default_model).device).startswith("cuda")
            got = score_vector(await predict(client, "chelsea.png"))
        # TF32 and different kernels: close, not bit-equal.
        assert torch.allclose(got, expected, atol=1e-3)
        assert got.argmax() == expected.argmax()

    run(scenario)
