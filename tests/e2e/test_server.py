"""The real thing: ``python -m app serve`` in a subprocess, spoken to over TCP on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from support import (
    CAT_CLASSES,
    COFFEE_CLASSES,
    DEFAULT_MODEL,
    MODELS,
    PHOTOS,
    ServerProcess,
    photo,
    running_server,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # Stopped with SIGTERM at the end, the normal way to stop a replica: it must exit 0.
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(log, EVALSERVE_MAX_BATCH_DELAY_MS="50") as server:
        yield server


def test_cat_photo_over_http_is_a_cat(server: ServerProcess) -> None:
    # What the README's curl does: multipart with one `file` part.
    response = httpx.post(
        f"{server.url}/v1/predict", files={"file": ("cat.jpg", photo("chelsea.jpg"))}, timeout=30
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == DEFAULT_MODEL
    assert body["predictions"][0]["classes"][0]["label"] in CAT_CLASSES


def test_raw_png_body_over_http(server: ServerProcess) -> None:
    response = httpx.post(
        f"{server.url}/v1/models/{DEFAULT_MODEL}/predict?top_k=3",
        content=photo("coffee.png"),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    classes = response.json()["predictions"][0]["classes"]
    assert len(classes) == 3 and classes[0]["label"] in COFFEE_CLASSES


def full_scores(url: str, name: str) -> torch.Tensor:
    response = httpx.post(
        f"{url}/v1/predict?top_k=1000", files={"file": (name, photo(name))}, timeout=60
    )
    assert response.status_code == 200, response.text
    scores = torch.zeros(1000)
    for entry in response.json()["predictions"][0]["classes"]:
        scores[entry["index"]] = entry["score"]
    return scores


def test_concurrent_clients_get_the_scores_they_get_alone(server: ServerProcess) -> None:
    alone = [full_scores(server.url, name) for name in PHOTOS]
    with concurrent.futures.ThreadPoolExecutor(len(PHOTOS)) as pool:
        together = list(pool.map(lambda name: full_scores(server.url, name), PHOTOS))
    for name, single, batched in zip(PHOTOS, alone, together, strict=True):
        assert torch.allclose(single, batched, atol=1e-5, rtol=0), name


def test_bad_uploads_get_clear_errors_and_the_server_keeps_serving(server: ServerProcess) -> None:
    cases = [
        ({"files": {"file": ("notes.jpg", b"plain text")}}, 400, "notes.jpg"),
        ({"content": b"hi", "headers": {"Content-Type": "text/plain"}}, 415, "text/plain"),
        ({"files": {"file": ("half.jpg", photo("chelsea.jpg")[:5000])}}, 400, "half.jpg"),
    ]
    for kwargs, status, fragment in cases:
        response = httpx.post(f"{server.url}/v1/predict", timeout=30, **kwargs)
        assert response.status_code == status, response.text
        assert fragment in response.json()["error"]["message"]
    test_cat_photo_over_http_is_a_cat(server)


def test_oversized_chunked_upload_is_refused_while_it_is_still_arriving(
    server: ServerProcess,
) -> None:
    """Send 21 MiB of a chunked body and then stop sending without finishing it.

    A server that buffered the whole body before checking would wait for the rest forever; the
    limit check must answer 413 as soon as 20 MiB have passed.
    """
    chunk = b"\x00" * (1024 * 1024)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        try:
            for _ in range(21):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close as soon as it has answered
        reply = b""
        while b"\r\n\r\n" not in reply:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_declared_oversized_body_is_refused_before_it_is_sent(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: image/jpeg\r\nContent-Length: 1000000000\r\n\r\n"
        )
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_console_script_and_module_share_one_cli() -> None:
    script = shutil.which("evalserve", path=str(Path(sys.executable).parent))
    assert script is not None, "the evalserve console script is not installed"
    result = subprocess.run(
        [script, "serve", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and "--model-repository" in result.stdout


def run_to_exit(log: Path, env: dict[str, str]) -> tuple[int, str]:
    server = ServerProcess(log, **env)
    return server.wait_exit(), server.output()


def broken_repository(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    shutil.copytree(MODELS / DEFAULT_MODEL, repo / DEFAULT_MODEL)
    (repo / "broken").mkdir()
    (repo / "broken" / "labels.txt").write_text("a\nb\n")
    (repo / "broken" / "model.toml").write_text(
        '[model]\nsource = "torchvision"\narchitecture = "squeezenet1_1"\n'
        '[weights]\nfile = "weights.pth"\n[labels]\nfile = "labels.txt"\n'
        "[preprocessing]\ncrop = 64\nmean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\n"
    )
    return repo


def test_missing_weights_stop_the_server_with_one_clear_line(tmp_path: Path) -> None:
    repo = broken_repository(tmp_path)
    code, output = run_to_exit(tmp_path / "log", {"EVALSERVE_MODEL_REPOSITORY": str(repo)})
    assert code != 0
    assert "cannot start: model 'broken': weights file not found" in output
    assert "Traceback" not in output


def test_weights_that_do_not_load_stop_the_server(tmp_path: Path) -> None:
    repo = broken_repository(tmp_path)
    torch.save({"features.0.weight": torch.zeros(1)}, repo / "broken" / "weights.pth")
    code, output = run_to_exit(tmp_path / "log", {"EVALSERVE_MODEL_REPOSITORY": str(repo)})
    assert code != 0
    assert "model 'broken': weights do not fit the architecture" in output
