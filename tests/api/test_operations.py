"""Operations in process: metrics that match what was sent, request ids and access logs, API
keys, and unexpected errors logged once without leaking internals."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi.testclient import TestClient
from support import ROOT, classifier_of, make_settings, metric, photo

from app.logs import JsonFormatter
from app.main import create_app
from app.metrics import Metrics

SECRET = "s3cret-key-do-not-log"


def test_metrics_match_what_was_sent() -> None:
    """4 single requests, one concurrent burst of 8, a bad image and a too-large image."""

    async def scenario() -> None:
        app = create_app(make_settings(max_batch_delay_ms=300, max_batch_size=16))
        async with LifespanManager(app, startup_timeout=120):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

                async def predict(data: bytes, name: str = "x.jpg") -> int:
                    response = await client.post("/v1/predict", files={"file": (name, data)})
                    return response.status_code

                for _ in range(4):
                    assert await predict(photo("chelsea.jpg")) == 200
                statuses = await asyncio.gather(*(predict(photo("coffee.jpg")) for _ in range(8)))
                assert statuses == [200] * 8
                assert await predict(b"not an image", "bad.jpg") == 400
                too_big = b"\x00" * (21 * 1024 * 1024)
                assert await predict(too_big, "big.jpg") == 413
                text = (await client.get("/metrics")).text
            batches = app.state.serving.default_model.batcher.stats.batches
        model = {"model": "efficientnet_lite0"}
        route = {"route": "/v1/predict", "method": "POST"}
        assert metric(text, "evalserve_requests_total", **route, status="200") == 12
        assert metric(text, "evalserve_requests_total", **route, status="400") == 1
        assert metric(text, "evalserve_requests_total", **route, status="413") == 1
        assert metric(text, "evalserve_request_duration_seconds_count", route="/v1/predict") == 14
        assert metric(text, "evalserve_images_processed_total", **model) == 12
        assert metric(text, "evalserve_images_rejected_total", **model, reason="bad_image") == 1
        assert metric(text, "evalserve_images_rejected_total", **model, reason="too_large") == 1
        assert metric(text, "evalserve_images_rejected_total", **model, reason="queue_full") == 0
        # The batch-size histogram saw every batch: 4 singles and the burst (in >= 1 batches).
        assert metric(text, "evalserve_batch_size_count", **model) == batches
        assert metric(text, "evalserve_batch_size_sum", **model) == 12
        # The 4 singles are batches of one; the burst may add one too when the machine is busy
        # (its first image can close a batch before the others are announced): not exactly 4.
        assert metric(text, "evalserve_batch_size_bucket", **model, le="1.0") >= 4
        assert batches < 12  # the burst was batched
        assert metric(text, "evalserve_queue_time_seconds_count", **model) == 12
        assert metric(text, "evalserve_inference_duration_seconds_count", **model) == batches
        assert metric(text, "evalserve_queue_depth", **model) == 0
        assert metric(text, "evalserve_model_ready", **model) == 1
        assert metric(text, "evalserve_model_ready", model="digits") == 1

    asyncio.run(scenario())


def test_unknown_paths_share_one_metrics_label() -> None:
    with TestClient(create_app(make_settings())) as client:
        for path in ("/a", "/b/c", "/d?x=1"):
            assert client.get(path).status_code == 404
        text = client.get("/metrics").text
    assert (
        metric(text, "evalserve_requests_total", route="unmatched", method="GET", status="404") == 3
    )
    assert '"/b/c"' not in text


@pytest.fixture
def client_with_keys() -> Iterator[TestClient]:
    settings = make_settings(api_keys=f"other-key, {SECRET}")
    with TestClient(create_app(settings)) as client:
        yield client


def test_without_a_key_predict_and_models_are_401(client_with_keys: TestClient) -> None:
    for response in (
        client_with_keys.post("/v1/predict", files={"file": photo("chelsea.jpg")}),
        client_with_keys.get("/v1/models"),
        client_with_keys.get("/v1/models/digits"),
        client_with_keys.post("/v1/predict", headers={"Authorization": "Basic abc"}),
    ):
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_a_wrong_key_is_403(client_with_keys: TestClient) -> None:
    response = client_with_keys.post(
        "/v1/predict",
        files={"file": photo("chelsea.jpg")},
        headers={"Authorization": f"Bearer {SECRET}x"},
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert SECRET not in response.text


def test_any_configured_key_is_accepted(client_with_keys: TestClient) -> None:
    for key in (SECRET, "other-key"):
        response = client_with_keys.post(
            "/v1/predict",
            files={"file": photo("chelsea.jpg")},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert response.status_code == 200, response.text
    listing = client_with_keys.get("/v1/models", headers={"Authorization": f"Bearer {SECRET}"})
    assert listing.status_code == 200


def test_health_and_metrics_stay_open_with_keys(client_with_keys: TestClient) -> None:
    assert client_with_keys.get("/health/live").status_code == 200
    assert client_with_keys.get("/health/ready").status_code == 200
    assert client_with_keys.get("/metrics").status_code == 200


def test_keys_never_reach_the_logs(
    client_with_keys: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client_with_keys.post(
        "/v1/predict",
        files={"file": photo("chelsea.jpg")},
        headers={"Authorization": f"Bearer {SECRET}"},
    )
    client_with_keys.get("/v1/models", headers={"Authorization": f"Bearer {SECRET}-wrong"})
    assert caplog.records
    assert all(SECRET not in record.getMessage() for record in caplog.records)
    assert SECRET not in repr(client_with_keys.app.state.settings)  # type: ignore[attr-defined]


def test_request_id_is_echoed_or_generated(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="evalserve.access")
    with TestClient(create_app(make_settings())) as client:
        given = client.post(
            "/v1/predict",
            files={"file": photo("chelsea.jpg")},
            headers={"X-Request-ID": "trace-42"},
        )
        generated = client.get("/health/live")
        unsafe = client.get("/health/live", headers={"X-Request-ID": "bad id\twith spaces"})
    assert given.headers["X-Request-ID"] == "trace-42"
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["X-Request-ID"])
    assert unsafe.headers["X-Request-ID"] != "bad id\twith spaces"
    lines = [r for r in caplog.records if r.name == "evalserve.access"]
    predict_line = next(r for r in lines if getattr(r, "request_id", None) == "trace-42")
    fields = vars(predict_line)  # the access log's extra= fields
    assert fields["method"] == "POST"
    assert fields["path"] == "/v1/predict"
    assert fields["status"] == 200
    assert fields["images"] == 1
    assert fields["model"] == "efficientnet_lite0"
    assert fields["latency_ms"] > 0
    text = predict_line.getMessage()
    assert '"POST /v1/predict" 200' in text
    assert "request_id=trace-42" in text


def test_json_log_lines_are_one_object_each(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="evalserve.access")
    with TestClient(create_app(make_settings())) as client:
        client.post("/v1/predict", files={"file": photo("coffee.jpg")})
    record = next(r for r in caplog.records if r.name == "evalserve.access")
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["logger"] == "evalserve.access"
    assert entry["level"] == "info"
    assert entry["status"] == 200
    assert entry["images"] == 1
    assert entry["model"] == "efficientnet_lite0"
    assert len(entry["request_id"]) == 32


def test_unexpected_error_is_logged_once_and_hidden_from_the_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app(make_settings())

    @app.get("/explode")
    async def explode() -> None:
        raise KeyError("internal detail: /secret/path")

    caplog.set_level(logging.INFO)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/explode", headers={"X-Request-ID": "boom-1"})
        assert client.get("/health/ready").status_code == 200  # still serving
    assert response.status_code == 500
    assert response.json() == {
        "error": {"code": "internal_error", "message": "internal server error"}
    }
    assert "KeyError" not in response.text
    assert "secret" not in response.text
    assert response.headers["X-Request-ID"] == "boom-1"
    with_traceback = [r for r in caplog.records if r.exc_info]
    assert len(with_traceback) == 1
    assert getattr(with_traceback[0], "request_id", None) == "boom-1"


def test_a_failed_batch_counts_each_of_its_images() -> None:
    """evalserve_images_rejected_total{reason="batch_failed"} counts images, not batches."""
    with TestClient(create_app(make_settings(runtime="torch"))) as client:
        module = client.app.state.serving.default_model.classifier.module  # type: ignore[attr-defined]
        failing = module.register_forward_pre_hook(_raise_injected)
        try:
            files = [
                ("file", ("a.jpg", photo("chelsea.jpg"))),
                ("file", ("b.jpg", photo("coffee.jpg"))),
            ]
            assert client.post("/v1/predict", files=files).status_code == 500
        finally:
            failing.remove()
        assert client.post("/v1/predict", files={"file": photo("chelsea.jpg")}).status_code == 200
        text = client.get("/metrics").text
    model = {"model": "efficientnet_lite0"}
    assert metric(text, "evalserve_failed_batches_total", **model) == 1
    assert metric(text, "evalserve_images_rejected_total", **model, reason="batch_failed") == 2
    assert metric(text, "evalserve_images_processed_total", **model) == 1


def test_images_in_flight_counts_the_computing_batch_and_the_queue() -> None:
    """evalserve_images_in_flight (what autoscaling reads) is every image accepted and not yet
    answered: while a batch of one is held in the forward pass and two more images wait, 3."""

    async def scenario() -> None:
        app = create_app(make_settings(runtime="torch", max_batch_size=2))
        async with LifespanManager(app, startup_timeout=120):
            model = app.state.serving.default_model
            entered, release = threading.Event(), threading.Event()

            def hold(*_: object) -> None:
                entered.set()
                release.wait(60)

            handle = classifier_of(model).module.register_forward_pre_hook(hold)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                try:
                    first = asyncio.ensure_future(
                        client.post("/v1/predict", files={"file": photo("chelsea.jpg")})
                    )
                    assert await asyncio.to_thread(entered.wait, 60)
                    two = [("file", (n, photo(n))) for n in ("coffee.jpg", "chelsea.jpg")]
                    second = asyncio.ensure_future(client.post("/v1/predict", files=two))
                    for _ in range(600):
                        if model.batcher.depth == 2:
                            break
                        await asyncio.sleep(0.05)
                    text = (await client.get("/metrics")).text
                finally:
                    release.set()
                    handle.remove()
                assert (await first).status_code == 200
                assert (await second).status_code == 200
                after = (await client.get("/metrics")).text
        labels = {"model": "efficientnet_lite0"}
        assert metric(text, "evalserve_queue_depth", **labels) == 2
        assert metric(text, "evalserve_images_in_flight", **labels) == 3
        assert metric(after, "evalserve_images_in_flight", **labels) == 0

    asyncio.run(scenario())


def _raise_injected(*_: object) -> None:
    raise RuntimeError("injected forward-pass failure")


def test_a_dead_batch_loop_turns_readiness_503_and_answers_at_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The defect: an observer raising killed the batch loop silently; readiness stayed 200 and
    every later request waited out its timeout. Here the loop's guard itself is broken, so the
    loop dies after its first batch, as it did then."""
    from app.batching import Batcher

    def broken_notify(_self: Batcher[object, object], event: str, *_args: object) -> None:
        raise RuntimeError(f"injected: the observer's {event} raised")

    monkeypatch.setattr(Batcher, "_notify", broken_notify)
    with TestClient(create_app(make_settings(request_timeout_s=60))) as client:
        lifecycle = client.app.state.lifecycle  # type: ignore[attr-defined]
        assert client.get("/health/ready").status_code == 200
        first = client.post("/v1/predict", files={"file": photo("chelsea.jpg")})
        assert first.status_code == 200  # answered before the observer was told
        ready = client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "failed"
        assert client.get("/v2/health/ready").status_code == 503
        began = time.monotonic()
        later = client.post("/v1/predict", files={"file": photo("chelsea.jpg")})
        assert later.status_code == 503
        assert later.headers["Retry-After"] == "1"
        assert time.monotonic() - began < 30  # at once, not after the 60 s request timeout
        # The server is on its way out: the other model takes no new work either.
        other = client.post("/v1/models/digits/predict", files={"file": photo("chelsea.jpg")})
        assert other.status_code == 503
        text = client.get("/metrics").text
    assert lifecycle.failure is not None
    assert "efficientnet_lite0" in lifecycle.failure
    assert metric(text, "evalserve_model_ready", model="efficientnet_lite0") == 0
    [death] = [r for r in caplog.records if r.name == "evalserve.batching"]
    assert "the batch loop died" in death.getMessage()
    assert death.exc_info is not None


# A row of the README's metrics table: | `name` | type | ...
METRIC_ROW = re.compile(r"^\| `(evalserve_[a-z_]+)` \| (?:counter|gauge|histogram) \|", re.M)


def test_the_readme_metrics_table_lists_every_metric_and_only_those() -> None:
    exported = {
        f"{family.name}_total" if family.type == "counter" else family.name
        for family in Metrics().registry.collect()
    }
    assert set(METRIC_ROW.findall((ROOT / "README.md").read_text())) == exported
