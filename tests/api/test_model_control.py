"""Model control (the Open Inference Protocol's model-repository extension): loading, reloading
and unloading real models while the server serves, in process, and with tritonclient against a
live server."""

from __future__ import annotations

import asyncio
import functools
import gc
import shutil
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import tritonclient.http as triton
from asgi_lifespan import LifespanManager
from support import (
    CAT_CLASSES,
    DEFAULT_MODEL,
    MODELS,
    classifier_of,
    live_server,
    make_settings,
    photo,
)
from tritonclient.utils import InferenceServerException

from app.main import create_app

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def in_a_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """An async test body, run in its own event loop (pytest runs only plain functions)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


@asynccontextmanager
async def serving(**overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The app in process, its lifespan run, with model control on unless told otherwise."""
    app = create_app(make_settings(**{"model_control": True, **overrides}))
    async with LifespanManager(app, startup_timeout=300, shutdown_timeout=120):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client, app


def repository(tmp_path: Path, *names: str) -> Path:
    """A copy of the shipped repository's models ``names``, to change files in."""
    repo = tmp_path / "models"
    for name in names:
        shutil.copytree(MODELS / name, repo / name)
    return repo


@pytest.fixture(scope="module")
def seven(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """One handwritten 7 from the digits model's held-out split."""
    from support import digits_trainer

    out = tmp_path_factory.mktemp("digits")
    digits_trainer().export_test_split(out)
    return sorted((out / "7").glob("*.png"))[0].read_bytes()


async def top_label(client: httpx.AsyncClient, model: str, image: bytes) -> str:
    response = await client.post(f"/v1/models/{model}/predict", files={"file": image})
    assert response.status_code == 200, response.text
    label: str = response.json()["predictions"][0]["classes"][0]["label"]
    return label


async def index(client: httpx.AsyncClient, **body: Any) -> dict[str, dict[str, str]]:
    response = await client.post("/v2/repository/index", json=body or None)
    assert response.status_code == 200, response.text
    return {entry.pop("name"): entry for entry in response.json()}


def gauge_models(metrics: str) -> set[str]:
    """The models evalserve_model_ready reports."""
    return {
        line.split('model="')[1].split('"')[0]
        for line in metrics.splitlines()
        if line.startswith("evalserve_model_ready{")
    }


@in_a_loop
async def test_model_control_is_off_by_default() -> None:
    async with serving(model_control=False) as (client, _):
        for method, path in [
            ("POST", "/v2/repository/index"),
            ("GET", "/v2/repository/index"),
            ("POST", "/v2/repository/models/digits/load"),
            ("POST", "/v2/repository/models/digits/unload"),
        ]:
            response = await client.request(method, path)
            assert response.status_code == 501, (path, response.text)
            assert "EVALSERVE_MODEL_CONTROL=true" in response.json()["error"]
        assert (await client.get("/v2/models/digits/ready")).status_code == 200
        # Not offered, so not documented.
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert not [path for path in paths if path.startswith("/v2/repository")]


@in_a_loop
async def test_unloaded_model_is_gone_and_loads_back(seven: bytes) -> None:
    async with serving() as (client, app):
        assert await index(client) == {
            "digits": {"version": "1", "state": "READY", "reason": ""},
            DEFAULT_MODEL: {"version": "1", "state": "READY", "reason": ""},
        }
        assert await top_label(client, "digits", seven) == "7"
        unloaded = app.state.serving.models["digits"]

        response = await client.post("/v2/repository/models/digits/unload")
        assert (response.status_code, response.content) == (200, b"")
        assert "digits" not in app.state.serving.models
        assert not unloaded.batcher.alive  # stopped, its thread freed
        assert (await client.get("/v2/models/digits/ready")).status_code == 404
        infer = await client.post(
            "/v2/models/digits/infer",
            json={"inputs": [{"name": "x", "shape": [1, 8, 8, 1], "datatype": "UINT8"}]},
        )
        assert infer.status_code == 404
        predict = await client.post("/v1/models/digits/predict", files={"file": seven})
        assert predict.status_code == 404
        # The server stays ready: the other models serve on.
        assert (await client.get("/health/ready")).status_code == 200
        assert (await client.get("/v2/health/ready")).status_code == 200
        assert await top_label(client, DEFAULT_MODEL, photo("chelsea.jpg")) in CAT_CLASSES
        assert (await index(client))["digits"] == {
            "version": "1",
            "state": "UNAVAILABLE",
            "reason": "unloaded",
        }
        assert list(await index(client, ready=True)) == [DEFAULT_MODEL]
        listed = (await client.get("/v1/models")).json()["models"]
        assert [model["name"] for model in listed] == [DEFAULT_MODEL]
        assert gauge_models((await client.get("/metrics")).text) == {DEFAULT_MODEL}
        again = await client.post("/v2/repository/models/digits/unload")
        assert again.status_code == 404
        assert "not loaded" in again.json()["error"]

        assert (await client.post("/v2/repository/models/digits/load")).status_code == 200
        assert app.state.serving.models["digits"] is not unloaded
        assert (await client.get("/v2/models/digits/ready")).status_code == 200
        assert await top_label(client, "digits", seven) == "7"
        assert (await index(client))["digits"]["state"] == "READY"
        assert gauge_models((await client.get("/metrics")).text) == {DEFAULT_MODEL, "digits"}


@in_a_loop
async def test_unload_answers_every_request_it_accepted(seven: bytes) -> None:
    """Requests racing an unload: each is answered by the model (200) or, arriving after it
    left, told it is not there (404); none is dropped or refused half way."""
    async with serving() as (client, app):
        model = app.state.serving.models["digits"]

        async def predict() -> int:
            response = await client.post("/v1/models/digits/predict", files={"file": seven})
            if response.status_code == 200:
                assert response.json()["predictions"][0]["classes"][0]["label"] == "7"
            return response.status_code

        requests = [asyncio.create_task(predict()) for _ in range(64)]
        await asyncio.sleep(0.01)  # some are admitted, some are still to come
        unload = await client.post("/v2/repository/models/digits/unload")
        statuses = await asyncio.gather(*requests)
        assert unload.status_code == 200
        assert set(statuses) <= {200, 404}, statuses
        assert 200 in statuses, "no request was accepted before the unload: the race was not run"
        # Every request answered 200 went through the unloaded model's batches.
        assert model.batcher.stats.items == statuses.count(200)


@in_a_loop
async def test_reload_serves_the_changed_files(tmp_path: Path, seven: bytes) -> None:
    repo = repository(tmp_path, DEFAULT_MODEL, "digits")
    async with serving(model_repository=repo) as (client, app):
        assert await top_label(client, "digits", seven) == "7"
        old = app.state.serving.models["digits"]
        (repo / "digits" / "labels.txt").write_text("\n".join(WORDS) + "\n")
        toml = repo / "digits" / "model.toml"
        toml.write_text(toml.read_text().replace("[model]\n", '[model]\nversion = "2"\n'))

        assert (await client.post("/v2/repository/models/digits/load")).status_code == 200
        assert await top_label(client, "digits", seven) == "seven"
        assert (await client.get("/v2/models/digits")).json()["versions"] == ["2"]
        assert (await index(client))["digits"] == {"version": "2", "state": "READY", "reason": ""}
        assert not old.batcher.alive  # the replaced model was stopped
        assert (await client.get("/health/ready")).status_code == 200


@in_a_loop
async def test_reload_under_load_loses_no_request(tmp_path: Path, seven: bytes) -> None:
    """Clients keep asking the model while it reloads twice: every one is answered 200, by the
    old model or the new one."""
    repo = repository(tmp_path, DEFAULT_MODEL, "digits")
    async with serving(model_repository=repo) as (client, _):
        done = asyncio.Event()
        labels: list[str] = []

        async def keep_asking() -> None:
            while not done.is_set():
                labels.append(await top_label(client, "digits", seven))

        clients = [asyncio.create_task(keep_asking()) for _ in range(8)]
        for words in (True, False):
            await asyncio.sleep(0.2)
            new = WORDS if words else [str(digit) for digit in range(10)]
            (repo / "digits" / "labels.txt").write_text("\n".join(new) + "\n")
            assert (await client.post("/v2/repository/models/digits/load")).status_code == 200
        await asyncio.sleep(0.2)
        done.set()
        await asyncio.gather(*clients)  # top_label asserted each answer was a 200
        assert {"7", "seven"} == set(labels), set(labels)


@in_a_loop
async def test_a_replaced_or_unloaded_model_is_freed(seven: bytes) -> None:
    """Nothing keeps the torch side of a model alive once it is replaced or unloaded (its
    memory can then go back to the OS): the server's state, metrics and frames let go."""
    async with serving() as (client, app):
        models = app.state.serving.models
        assert await top_label(client, "digits", seven) == "7"
        replaced = weakref.ref(classifier_of(models[DEFAULT_MODEL]))
        unloaded = weakref.ref(classifier_of(models["digits"]))
        await client.post(f"/v2/repository/models/{DEFAULT_MODEL}/load")
        await client.post("/v2/repository/models/digits/unload")
        await client.get("/metrics")
        gc.collect()
        assert replaced() is None
        assert unloaded() is None
        assert await top_label(client, DEFAULT_MODEL, photo("chelsea.jpg")) in CAT_CLASSES


@in_a_loop
async def test_a_model_that_cannot_load_says_why_and_changes_nothing(
    tmp_path: Path, seven: bytes
) -> None:
    repo = repository(tmp_path, DEFAULT_MODEL, "digits")
    async with serving(model_repository=repo) as (client, app):
        served = dict(app.state.serving.models)

        # A model.toml that does not parse: found when the repository is read.
        broken = repo / "broken"
        shutil.copytree(repo / "digits", broken)
        toml = broken / "model.toml"
        toml.write_text(toml.read_text().replace("[model]\n", "[model]\nbogus = 1\n"))
        response = await client.post("/v2/repository/models/broken/load")
        assert response.status_code == 400
        assert "model 'broken'" in response.json()["error"]
        assert "bogus" in response.json()["error"]
        entry = (await index(client))["broken"]
        assert entry["state"] == "UNAVAILABLE"
        assert "bogus" in entry["reason"]
        shutil.rmtree(broken)

        # A model file that is missing, and labels that do not fit the model's output: found
        # when the model is built and warmed.
        missing = repo / "missing"
        shutil.copytree(repo / "digits", missing)
        (missing / "model.pt2").unlink()
        response = await client.post("/v2/repository/models/missing/load")
        assert response.status_code == 400
        assert "model file not found" in response.json()["error"]
        shutil.rmtree(missing)
        misfit = repo / "misfit"
        shutil.copytree(repo / "digits", misfit)
        (misfit / "labels.txt").write_text("a\nb\nc\n")
        response = await client.post("/v2/repository/models/misfit/load")
        assert response.status_code == 400
        assert "model 'misfit'" in response.json()["error"]
        assert (await index(client))["misfit"]["reason"] == response.json()["error"]

        assert app.state.serving.models == served
        assert await top_label(client, "digits", seven) == "7"
        assert (await client.get("/health/ready")).status_code == 200

        # A reload that fails leaves the loaded model serving.
        (repo / "digits" / "labels.txt").write_text("a\nb\nc\n")
        response = await client.post("/v2/repository/models/digits/load")
        assert response.status_code == 400
        assert app.state.serving.models["digits"] is served["digits"]
        assert await top_label(client, "digits", seven) == "7"
        entry = (await index(client))["digits"]
        assert entry["state"] == "READY"
        assert entry["reason"].startswith("reload failed: model 'digits'")

        unknown = await client.post("/v2/repository/models/nope/load")
        assert unknown.status_code == 404
        assert "no model 'nope'" in unknown.json()["error"]


@in_a_loop
async def test_unloading_the_default_model_is_refused() -> None:
    async with serving() as (client, _):
        response = await client.post(f"/v2/repository/models/{DEFAULT_MODEL}/unload")
        assert response.status_code == 400
        assert "default model" in response.json()["error"]
        assert await top_label(client, DEFAULT_MODEL, photo("chelsea.jpg")) in CAT_CLASSES


@in_a_loop
async def test_loads_and_unloads_of_one_model_take_turns(seven: bytes) -> None:
    """Sent at once, they run one after the other in the order they came: each succeeds, and
    the model ends loaded once, with one batcher."""
    async with serving() as (client, app):
        first = app.state.serving.models["digits"]
        calls = [
            client.post(f"/v2/repository/models/digits/{operation}")
            for operation in ("unload", "load", "unload", "load", "load")
        ]
        statuses = [response.status_code for response in await asyncio.gather(*calls)]
        assert statuses == [200] * 5
        assert not first.batcher.alive
        assert app.state.serving.models["digits"].batcher.alive
        assert await top_label(client, "digits", seven) == "7"


@in_a_loop
async def test_model_control_needs_the_api_key() -> None:
    async with serving(api_keys="key-one") as (client, _):
        path = "/v2/repository/models/digits/unload"
        assert (await client.post(path)).status_code == 401
        assert (await client.post("/v2/repository/index")).status_code == 401
        wrong = {"Authorization": "Bearer key-two"}
        assert (await client.post(path, headers=wrong)).status_code == 403
        assert (await client.get("/v2/models/digits/ready", headers=wrong)).status_code == 403
        right = {"Authorization": "Bearer key-one"}
        assert (await client.get("/v2/models/digits/ready", headers=right)).status_code == 200
        assert (await client.post(path, headers=right)).status_code == 200
        assert (await client.get("/v2/models/digits/ready", headers=right)).status_code == 404


@in_a_loop
async def test_load_refuses_a_model_sent_with_the_request_and_bad_bodies() -> None:
    async with serving() as (client, app):
        response = await client.post(
            "/v2/repository/models/digits/load", json={"parameters": {"config": "{}"}}
        )
        assert response.status_code == 400
        assert "from its repository only" in response.json()["error"]
        response = await client.post("/v2/repository/index", content=b"not json")
        assert response.status_code == 400
        response = await client.post("/v2/repository/index", json={"ready": "yes"})
        assert response.status_code == 400
        response = await client.post(
            "/v2/repository/models/digits/unload", json={"parameters": False}
        )
        assert response.status_code == 400
        assert "digits" in app.state.serving.models
        # Offered, so documented.
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert {
            "/v2/repository/index",
            "/v2/repository/models/{name}/load",
            "/v2/repository/models/{name}/unload",
        } <= set(paths)


@pytest.fixture(scope="module")
def triton_client() -> Iterator[triton.InferenceServerClient]:
    with live_server(model_control=True) as (url, _):
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        yield client
        client.close()


def test_tritonclient_controls_models(triton_client: triton.InferenceServerClient) -> None:
    client = triton_client
    index = {entry["name"]: entry for entry in client.get_model_repository_index()}
    assert index["digits"] == {"name": "digits", "version": "1", "state": "READY", "reason": ""}
    assert index[DEFAULT_MODEL]["state"] == "READY"

    client.unload_model("digits")
    assert not client.is_model_ready("digits")
    assert client.is_server_ready()
    states = {entry["name"]: entry["state"] for entry in client.get_model_repository_index()}
    assert states == {"digits": "UNAVAILABLE", DEFAULT_MODEL: "READY"}

    client.load_model("digits")
    assert client.is_model_ready("digits")
    assert client.get_model_metadata("digits")["outputs"][0]["shape"] == [-1, 10]

    with pytest.raises(InferenceServerException, match="no model 'nope' in the repository"):
        client.load_model("nope")
    with pytest.raises(InferenceServerException, match="default model"):
        client.unload_model(DEFAULT_MODEL)
    with pytest.raises(InferenceServerException, match="from its repository only"):
        client.load_model("digits", config='{"max_batch_size": 8}')
    assert client.is_model_ready("digits")
