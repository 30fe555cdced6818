"""Failures a running server makes visible, with the real models in process: a forward pass that
hangs past the request timeout turns readiness 503 until it returns; a batch that runs out of
device memory is computed again in halves, or answered 507, and serving goes on; a model whose
worker takes no more work turns not ready, logged with its traceback."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import grpc
import httpx
import pytest
import torch
from asgi_lifespan import LifespanManager
from fastapi.testclient import TestClient
from support import CAT_CLASSES, PHOTOS, classifier_of, make_settings, metric, photo

from app.api.errors import InsufficientStorage
from app.api.grpc.service import status_of
from app.main import create_app
from app.model import runtime
from app.model.runtime import Classifier

MODEL = "efficientnet_lite0"


async def _status_becomes(client: httpx.AsyncClient, path: str, status: int) -> httpx.Response:
    """GET ``path`` until it answers ``status`` (at most a minute)."""
    for _ in range(600):
        response = await client.get(path)
        if response.status_code == status:
            return response
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} never answered {status}: {response.status_code}")


def test_a_hung_forward_pass_turns_readiness_503_until_it_returns() -> None:
    """The forward pass of one request hangs past the request timeout: the probes say
    "stalled" (so Kubernetes stops routing here), the request behind it waits in the queue, and
    once the pass returns that request is answered and the server is ready again."""

    async def scenario() -> dict[str, Any]:
        app = create_app(make_settings(runtime="torch", request_timeout_s=3.0))
        async with LifespanManager(app, startup_timeout=180):
            model = app.state.serving.default_model
            entered, release = threading.Event(), threading.Event()

            def hang(*_: object) -> None:
                entered.set()
                release.wait(60)

            handle = classifier_of(model).module.register_forward_pre_hook(hang)
            transport = httpx.ASGITransport(app=app)
            seen: dict[str, Any] = {}
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                try:
                    seen["before"] = (await client.get("/health/ready")).status_code
                    hung = asyncio.ensure_future(
                        client.post("/v1/predict", files={"file": photo("coffee.jpg")})
                    )
                    assert await asyncio.to_thread(entered.wait, 60)
                    seen["ready"] = await _status_becomes(client, "/health/ready", 503)
                    seen["v2"] = await client.get("/v2/health/ready")
                    seen["model"] = await client.get(f"/v2/models/{MODEL}/ready")
                    seen["metrics"] = (await client.get("/metrics")).text
                    seen["hung"] = await hung  # its own timeout passed meanwhile
                    behind = asyncio.ensure_future(
                        client.post("/v1/predict", files={"file": photo("chelsea.jpg")})
                    )
                    for _ in range(600):
                        if model.batcher.depth == 1:
                            break
                        await asyncio.sleep(0.01)
                    seen["queued"] = model.batcher.depth
                finally:
                    release.set()
                    handle.remove()
                seen["behind"] = await behind
                seen["after"] = await client.get("/health/ready")
                seen["metrics_after"] = (await client.get("/metrics")).text
        return seen

    seen = asyncio.run(scenario())

    assert seen["before"] == 200
    assert seen["ready"].json()["error"]["code"] == "stalled"
    assert seen["v2"].status_code == 503
    assert "stalled" in seen["v2"].json()["error"]
    assert seen["model"].status_code == 503
    assert "stalled" in seen["model"].json()["error"]
    labels = {"model": MODEL}
    assert metric(seen["metrics"], "evalserve_model_stalled", **labels) == 1
    assert metric(seen["metrics"], "evalserve_model_ready", **labels) == 0
    assert metric(seen["metrics"], "evalserve_model_stalled", model="digits") == 0
    assert seen["hung"].status_code == 504
    assert seen["queued"] == 1
    # The request behind the hung pass is answered, and the server is ready again.
    assert seen["behind"].status_code == 200
    [prediction] = seen["behind"].json()["predictions"]
    assert prediction["classes"][0]["label"] in CAT_CLASSES
    assert seen["after"].status_code == 200
    after = seen["metrics_after"]
    assert metric(after, "evalserve_model_stalled", **labels) == 0
    assert metric(after, "evalserve_model_ready", **labels) == 1
    assert metric(after, "evalserve_stalled_batches_total", **labels) == 1


def _top(body: dict[str, Any]) -> list[tuple[int, float]]:
    """Each image's best class and its score, in upload order."""
    return [(p["classes"][0]["index"], p["classes"][0]["score"]) for p in body["predictions"]]


def test_out_of_memory_computes_the_batch_in_halves_or_answers_507_and_serving_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch's CUDA out-of-memory error injected into the forward pass, on the CPU, for
    batches larger than ``fits``: 8 images fit as two halves of 4; when no half fits, the
    request is answered 507 and the next one is served."""
    fits: int | None = None
    sizes: list[int] = []
    forward = Classifier._forward

    def short_of_memory(self: Classifier, batch: torch.Tensor) -> torch.Tensor:
        sizes.append(batch.shape[0])
        if fits is not None and batch.shape[0] > fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return forward(self, batch)

    monkeypatch.setattr(Classifier, "_forward", short_of_memory)
    eight = [("file", (name, photo(name))) for name in PHOTOS]
    assert len(eight) == 8
    with TestClient(create_app(make_settings(max_batch_size=8))) as client:
        batcher = client.app.state.serving.default_model.batcher  # type: ignore[attr-defined]

        def sizes_when_idle() -> list[int]:
            # A request is answered once one of its halves fails; the other half still runs.
            deadline = time.monotonic() + 60
            while batcher.in_flight and time.monotonic() < deadline:
                time.sleep(0.01)
            return list(sizes)

        expected = client.post("/v1/predict", files=eight)
        assert expected.status_code == 200
        fits, sizes[:] = 4, []
        halved = client.post("/v1/predict", files=eight)
        halved_sizes = sizes_when_idle()
        fits, sizes[:] = 0, []
        refused = client.post("/v1/predict", files=eight)
        refused_sizes = sizes_when_idle()
        ready_after_refusal = client.get("/health/ready").status_code
        fits = None
        later = client.post("/v1/predict", files={"file": photo("chelsea.jpg")})
        text = client.get("/metrics").text

    assert halved_sizes == [8, 4, 4]
    assert halved.status_code == 200
    got, want = _top(halved.json()), _top(expected.json())
    assert [index for index, _ in got] == [index for index, _ in want]
    assert [score for _, score in got] == pytest.approx([score for _, score in want], rel=1e-3)
    assert refused_sizes == [8, 4, 4]  # halved once, never further
    assert refused.status_code == 507
    assert refused.json()["error"]["code"] == "insufficient_storage"
    assert "1.00 GiB" not in refused.text  # no internals to the client
    assert ready_after_refusal == 200
    assert later.status_code == 200
    assert later.json()["predictions"][0]["classes"][0]["label"] in CAT_CLASSES
    labels = {"model": MODEL}
    assert metric(text, "evalserve_oom_splits_total", **labels) == 2
    assert metric(text, "evalserve_images_rejected_total", **labels, reason="out_of_memory") == 8
    assert metric(text, "evalserve_images_rejected_total", **labels, reason="batch_failed") == 0
    assert metric(text, "evalserve_images_processed_total", **labels) == 8 + 8 + 1


def test_insufficient_storage_is_resource_exhausted_over_grpc() -> None:
    assert status_of(InsufficientStorage("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_model_whose_worker_takes_no_more_work_turns_not_ready_with_its_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The torch worker thread is gone (shut down here): rather than failing every batch with
    500 while the probes say ready, the model's batch loop dies, visibly."""
    # This app's own CPU worker, so that shutting it down breaks no other test's.
    monkeypatch.setattr(runtime, "_CPU_WORKER", None)
    with TestClient(create_app(make_settings(request_timeout_s=60))) as client:
        lifecycle = client.app.state.lifecycle  # type: ignore[attr-defined]
        model = client.app.state.serving.models["digits"]  # type: ignore[attr-defined]
        classifier_of(model).executor.shutdown()
        answer = client.post("/v1/models/digits/predict", files={"file": photo("chelsea.jpg")})
        ready = client.get("/health/ready")
        model_ready = client.get("/v2/models/digits/ready")
        text = client.get("/metrics").text
        alive = model.batcher.alive

    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "unavailable"
    assert not alive
    assert ready.status_code == 503
    assert ready.json()["error"]["code"] == "failed"
    assert model_ready.status_code == 503
    assert metric(text, "evalserve_model_ready", model="digits") == 0
    assert lifecycle.failure is not None
    assert "digits" in lifecycle.failure
    [death] = [r for r in caplog.records if "the batch loop died" in r.getMessage()]
    assert death.levelno == logging.CRITICAL
    assert death.exc_info is not None
    assert "takes no more work" in str(death.exc_info[1])
