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
    assert len(classes) == 3
    assert classes[0]["label"] in COFFEE_CLASSES


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
        assert isinstance(kwargs, dict)
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
    assert result.returncode == 0
    assert "--model-repository" in result.stdout


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
    assert code == 3
    [line] = [line for line in output.splitlines() if "cannot start" in line]
    assert "model 'broken': weights do not fit the architecture" in line
    # One message, not the 60-line traceback uvicorn used to print after it.
    assert "Traceback" not in output
    assert len([line for line in output.splitlines() if " ERROR " in line]) <= 2, output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_stops_with_one_line(tmp_path: Path) -> None:
    code, output = run_to_exit(tmp_path / "log", {"EVALSERVE_DEVICE": "cuda"})
    assert code == 3
    assert "cannot start: model" in output
    assert "CUDA is not available" in output
    assert "Traceback" not in output


def test_a_taken_port_fails_at_once_before_any_model_loads(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with (tmp_path / "log").open("wb") as log:
            result = subprocess.run(
                [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=False,
            )
    output = (tmp_path / "log").read_text()
    assert result.returncode == 2, output
    assert f"cannot start: cannot listen on 127.0.0.1:{port}" in output
    assert "loading model" not in output
    assert "Traceback" not in output


def test_version_and_help_instead_of_a_server() -> None:
    version = subprocess.run(
        [sys.executable, "-m", "app", "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0
    assert version.stdout.strip().startswith("evalserve ")
    bare = subprocess.run([sys.executable, "-m", "app"], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2
    assert "usage: evalserve" in bare.stdout
    assert "serve" in bare.stdout
    assert "loading model" not in bare.stdout + bare.stderr


def test_a_misspelt_setting_refuses_to_start_naming_the_right_one(tmp_path: Path) -> None:
    code, output = run_to_exit(tmp_path / "log", {"EVALSERVE_MAX_BATCH": "4"})
    assert code == 2
    assert "EVALSERVE_MAX_BATCH (did you mean EVALSERVE_MAX_BATCH_SIZE?)" in output
    assert "loading model" not in output


def test_a_dead_batch_loop_stops_the_server_with_exit_1(tmp_path: Path) -> None:
    """The batch loop dies after its first batch (its observer call is broken on purpose): the
    request in hand is answered, readiness turns 503, and the process exits 1 so that Docker or
    Kubernetes restarts it, instead of staying "ready" with every request timing out."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import sys\n"
        "from app.batching import Batcher\n"
        "def broken(self, event, *args):\n"
        "    raise RuntimeError('injected: the observer raised')\n"
        "Batcher._notify = broken\n"
        "from app.tools.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    server = ServerProcess(tmp_path / "log", launcher=launcher, EVALSERVE_DRAIN_DELAY_S="0")
    try:
        server.wait_ready()
        answered = httpx.post(
            f"{server.url}/v1/models/digits/predict",
            files={"file": photo("chelsea.jpg")},
            timeout=30,
        )
        assert answered.status_code == 200
        code = server.wait_exit(timeout=60)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
    output = server.output()
    assert code == 1, output
    assert "digits: the batch loop died" in output
    assert "RuntimeError: injected: the observer raised" in output  # with its traceback
