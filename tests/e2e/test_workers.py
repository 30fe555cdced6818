"""EVALSERVE_WORKERS=2: two HTTP front-end processes feeding the one process that runs the
models, through shared memory (app.workers, app.handoff), against real servers."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from support import MODELS, PHOTOS, ROOT, ServerProcess, fixture, metric, photo, ready_server

pytestmark = pytest.mark.e2e

MODEL = "efficientnet_lite0"
# The module's server: a small queue, so that overload is easy to reach.
QUEUE = 16
PATIENCE_S = 30.0


def frontends(server: ServerProcess) -> set[int]:
    """The front-end processes the server (the model process) started."""
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {
        int(child)
        for child in children
        if b"frontend_main" in Path(f"/proc/{child}/cmdline").read_bytes()
    }


def loads_torch(pid: int) -> bool:
    """Whether the process has torch's library mapped (it imported torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def scrape(url: str) -> str:
    with httpx.Client() as client:  # a connection of its own: any front-end may take it
        response = client.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    return response.text


def processed(url: str) -> float:
    """The model process's count of images through a forward pass, as a front-end reports it
    (none before the model's first batch)."""
    return figure(scrape(url), "evalserve_images_processed_total")


def figure(text: str, sample: str) -> float:
    """``sample`` of MODEL, 0 when absent (a counter not yet counted)."""
    if f'{sample}{{model="{MODEL}"}}' not in text:
        return 0.0
    return metric(text, sample, model=MODEL)


def post(url: str, names: list[str], model: str = MODEL, top_k: int = 5) -> httpx.Response:
    files = [
        ("file", (name, photo(name) if name.endswith(".jpg") else fixture(name).read_bytes()))
        for name in names
    ]
    with httpx.Client() as client:
        return client.post(
            f"{url}/v1/models/{model}/predict", params={"top_k": top_k}, files=files, timeout=60
        )


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """A two-front-end server and a single-process one, on the same models and settings."""
    with tempfile.TemporaryDirectory() as folder:
        env = {"EVALSERVE_MAX_QUEUE_SIZE": str(QUEUE)}
        workers = ServerProcess(Path(folder) / "workers.log", EVALSERVE_WORKERS="2", **env)
        single = ServerProcess(Path(folder) / "single.log", **env)
        try:
            workers.wait_ready()
            single.wait_ready()
            yield workers, single
        finally:
            codes = (workers.stop(), single.stop())
        assert codes == (0, 0), workers.output()
        assert "Traceback" not in workers.output(), workers.output()


def test_both_front_ends_answer_and_neither_loads_torch(servers) -> None:
    server, _ = servers
    pids = frontends(server)
    assert len(pids) == 2, server.output()
    seen: set[int] = set()
    with ThreadPoolExecutor(8) as pool:
        for _ in range(50):  # at most 400 scrapes; both answer within a few
            for text in pool.map(lambda _: scrape(server.url), range(8)):
                info = [
                    int(line.split('pid="')[1].split('"')[0])
                    for line in text.splitlines()
                    if line.startswith("evalserve_frontend_info{")
                ]
                assert len(info) == 1, text
                seen.add(info[0])
            if seen == pids:
                break
    assert seen == pids
    # The front-ends never imported torch; the model process did (so the check can fail).
    assert not any(loads_torch(pid) for pid in pids)
    assert loads_torch(server.process.pid)


def test_predictions_equal_the_single_process_servers(servers) -> None:
    workers, single = servers
    for model, names in (
        (MODEL, [*PHOTOS, "coffee.png"]),
        ("digits", ["chelsea.png", *PHOTOS[:3]]),
    ):
        for name in names:  # one image per request: the same batch size in both servers
            ours, theirs = post(workers.url, [name], model), post(single.url, [name], model)
            assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
            got = ours.json()["predictions"][0]["classes"]
            want = theirs.json()["predictions"][0]["classes"]
            assert [c["index"] for c in got] == [c["index"] for c in want], name
            assert [c["label"] for c in got] == [c["label"] for c in want], name
            for a, b in zip(got, want, strict=True):
                assert a["score"] == pytest.approx(b["score"], abs=1e-6), name


def test_a_burst_of_concurrent_requests_is_answered_and_every_image_computed(servers) -> None:
    server, _ = servers
    before = processed(server.url)
    requests = [[PHOTOS[i % len(PHOTOS)]] for i in range(48)]
    with ThreadPoolExecutor(QUEUE - 4) as pool:
        statuses = list(pool.map(lambda names: post(server.url, names).status_code, requests))
    assert statuses == [200] * len(requests)
    # Every answer was computed before it was sent: the count is final.
    assert processed(server.url) == before + len(requests)


def test_overload_is_answered_503_with_retry_after(servers) -> None:
    server, _ = servers
    # Six clients at once, each with half a queue of images: some must be turned away.
    names = [PHOTOS[i % len(PHOTOS)] for i in range(QUEUE // 2)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: post(server.url, names), range(18)))
    statuses = sorted({answer.status_code for answer in answers})
    assert statuses == [200, 503], statuses
    for answer in answers:
        if answer.status_code == 503:
            assert answer.headers["retry-after"] == "1"
            assert answer.json()["error"]["code"] == "overloaded", answer.text


def test_sigterm_answers_the_requests_in_flight_and_exits_0(tmp_path: Path) -> None:
    with ready_server(
        tmp_path / "server.log",
        EVALSERVE_WORKERS="2",
        EVALSERVE_MODEL_REPOSITORY=str(MODELS / MODEL),
        EVALSERVE_DRAIN_DELAY_S="0.2",
    ) as server:
        pids = frontends(server)
        before = processed(server.url)
        names = PHOTOS * 2  # 16 images a request
        answers: list[int] = []
        clients = [
            threading.Thread(target=lambda: answers.append(post(server.url, names).status_code))
            for _ in range(4)
        ]
        for client in clients:
            client.start()
        # Until every image has reached the model process, some of them still computing: the
        # requests were all accepted before the SIGTERM, and are in flight.
        deadline = time.monotonic() + PATIENCE_S
        while True:
            text = scrape(server.url)
            done = figure(text, "evalserve_images_processed_total") - before
            waiting = metric(text, "evalserve_images_in_flight", model=MODEL)
            if done + waiting == 4 * len(names):
                break
            assert time.monotonic() < deadline, f"{done} + {waiting} images reached the model"
        assert waiting > 0, "everything was answered before the SIGTERM: nothing to drain"
        server.process.send_signal(signal.SIGTERM)
        for client in clients:
            client.join(timeout=60)
        assert answers == [200] * 4, server.output()
        assert server.wait_exit(timeout=60) == 0, server.output()
        assert "Traceback" not in server.output(), server.output()
        assert "drained in" in server.output()
        assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


def test_a_front_end_that_dies_stops_the_server_with_exit_1(tmp_path: Path) -> None:
    with ready_server(
        tmp_path / "server.log",
        EVALSERVE_WORKERS="2",
        EVALSERVE_MODEL_REPOSITORY=str(MODELS / "digits"),
        EVALSERVE_DRAIN_DELAY_S="0",
    ) as server:
        victim, survivor = sorted(frontends(server))
        subprocess.run(["kill", "-KILL", str(victim)], check=True)
        assert server.wait_exit(timeout=60) == 1, server.output()
        assert f"front-end process {victim} exited" in server.output()
        assert not Path(f"/proc/{survivor}").exists()


def test_model_control_with_several_front_ends_is_refused_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "serve"],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "EVALSERVE_WORKERS": "2",
            "EVALSERVE_MODEL_CONTROL": "true",
            "EVALSERVE_DEVICE": "cpu",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "EVALSERVE_MODEL_CONTROL=true needs EVALSERVE_WORKERS=1" in lines[0]
