"""The Python clients, ``evalserve predict`` and ``evaluate --url`` against a live HTTP server.

The server runs in a thread of this process (real uvicorn, real TCP on 127.0.0.1), so a test can
reach its state: to hold a model's worker and make the queue overflow on purpose.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image
from support import CAT_CLASSES, COFFEE_CLASSES, MODELS, fixture, live_server, photo

from app.client import AsyncClient, Client, EvalserveError
from app.state import ServedModel
from app.tools.cli import main

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with live_server() as (url, _):
        yield url


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_client_predicts_a_path_bytes_and_a_pil_image(server: str) -> None:
    with Client(server) as client:
        assert client.health() is True
        by_path = client.predict(fixture("chelsea.jpg"), top_k=3)
        assert by_path.file == "chelsea.jpg"
        assert len(by_path.classes) == 3
        assert by_path.classes[0].label in CAT_CLASSES
        by_bytes = client.predict(photo("coffee.jpg"))
        assert by_bytes.classes[0].label in COFFEE_CLASSES
        pil = Image.open(io.BytesIO(photo("chelsea.png"))).convert("RGB")
        assert client.predict(pil, top_k=1).classes[0].label in CAT_CLASSES
        many = client.predict_many([photo("coffee.jpg"), fixture("chelsea.jpg")], top_k=1)
        assert len(many) == 2
        assert many[0].classes[0].label in COFFEE_CLASSES
        assert many[1].classes[0].label in CAT_CLASSES
        names = {m.name for m in client.models()}
        assert {"efficientnet_lite0", "digits"} <= names
        assert client.labels("digits") == [str(d) for d in range(10)]


def test_async_client_predicts_concurrently(server: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(server) as client:
            assert await client.health() is True
            cat, coffee = await asyncio.gather(
                client.predict(fixture("chelsea.jpg")), client.predict(photo("coffee.png"))
            )
            assert cat.classes[0].label in CAT_CLASSES
            assert coffee.classes[0].label in COFFEE_CLASSES

    asyncio.run(scenario())


def test_server_errors_raise_one_exception_type_with_the_servers_message(server: str) -> None:
    with Client(server) as client:
        with pytest.raises(EvalserveError) as caught:
            client.predict(b"definitely not an image")
        assert caught.value.status_code == 400
        assert caught.value.code == "invalid_image"
        assert "not a supported image" in caught.value.message
        with pytest.raises(EvalserveError) as missing:
            client.predict(photo("coffee.jpg"), model="no_such_model")
        assert missing.value.status_code == 404


@contextmanager
def full_queue(url: str, model: ServedModel) -> Iterator[threading.Event]:
    """With max_batch_size=1 and max_queue_size=1: hold the model's worker, get one image into
    the stuck batch and one into the queue. Set the yielded event to let them all finish."""
    gate = threading.Event()
    blocker = model.classifier.executor.submit(gate.wait, 30)
    with Client(url) as busy:
        threads = [
            threading.Thread(target=busy.predict, args=(photo(name),))
            for name in ("rocket.jpg", "coffee.jpg")
        ]
        try:
            for thread in threads:
                thread.start()
            wait_until(lambda: model.batcher.in_flight == 1 and model.batcher.depth == 1)
            yield gate
        finally:
            gate.set()
            blocker.result()
            for thread in threads:
                thread.join(timeout=30)


def test_client_retries_a_503_after_retry_after() -> None:
    with live_server(max_batch_size=1, max_queue_size=1, max_batch_delay_ms=0) as (url, app):
        statuses: list[int] = []

        def record(response: httpx.Response) -> None:
            statuses.append(response.status_code)

        with (
            full_queue(url, app.state.serving.default_model) as gate,
            Client(url, event_hooks={"response": [record]}) as client,
        ):
            threading.Timer(0.3, gate.set).start()  # the worker frees up during the wait
            result = client.predict(photo("chelsea.jpg"), top_k=1)
        assert statuses[0] == 503, statuses
        assert statuses[-1] == 200, statuses
        assert result.classes[0].label in CAT_CLASSES


def test_client_gives_up_after_its_retries() -> None:
    with live_server(max_batch_size=1, max_queue_size=1, max_batch_delay_ms=0) as (url, app):
        with (
            full_queue(url, app.state.serving.default_model),
            Client(url, retries=0) as client,
            pytest.raises(EvalserveError) as caught,
        ):
            client.predict(photo("chelsea.jpg"))
        assert caught.value.status_code == 503
        assert caught.value.code == "overloaded"
        assert caught.value.retry_after == 1.0


def test_predict_command_prints_a_table_and_json(
    server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cat = str(fixture("chelsea.jpg"))
    assert main(["predict", "--url", server, "--top-k", "2", cat]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == cat
    assert table[1].split()[0] in {"Egyptian", "tabby", "tiger"}
    assert len(table) == 4  # name, two classes, blank line
    assert main(["predict", "--url", server, "--json", cat, str(fixture("coffee.jpg"))]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [len(r["classes"]) for r in results] == [5, 5]
    assert results[1]["classes"][0]["label"] in COFFEE_CLASSES


def test_predict_command_reports_a_bad_file_and_exits_nonzero(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    assert main(["predict", "--url", server, str(bad), str(fixture("coffee.jpg"))]) == 1
    captured = capsys.readouterr()
    assert "notes.jpg" in captured.err
    assert "400" in captured.err
    assert "espresso" in captured.out


def test_evaluate_through_the_server_matches_in_process_exactly(
    server: str, digits_test_split: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--model", "digits", "--json", str(digits_test_split)]
    base = ["evaluate", "--model-repository", str(MODELS), "--device", "cpu"]
    assert main([*base, *common]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--url", server, "--concurrency", "8", *common]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert remote["source"] == server
    assert local["source"] == "in process"
    assert remote["evaluated"] == local["evaluated"] == 360
    assert remote["top1"] == local["top1"]
    assert remote["top5"] == local["top5"]
    assert remote["predictions"] == local["predictions"]


def test_evaluate_through_the_server_checks_folder_names_against_its_labels(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "zebra").mkdir()
    (tmp_path / "zebra" / "a.jpg").write_bytes(photo("chelsea.jpg"))
    assert main(["evaluate", "--url", server, "--model", "digits", str(tmp_path)]) == 2
    assert "'zebra'" in capsys.readouterr().err
