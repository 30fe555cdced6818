"""The hostile-input corpus (tests/corpus, written by make_corpus.py) against one real server.

Every case is sent over its own TCP connection, byte for byte as the manifest describes it; its
answer must be the status (and error code or message) the manifest expects, and the next good
request, the cat photograph, must still be answered correctly. After the whole corpus the
server's resident memory must be back within 10% of what it was once warmed up.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from corpus import make_corpus
from support import CAT_CLASSES, ROOT, ServerProcess, photo, running_server

pytestmark = pytest.mark.e2e

CORPUS = ROOT / "tests" / "corpus"
CASES: list[dict[str, Any]] = json.loads((CORPUS / "manifest.json").read_text())
# A body that stops arriving is answered 408 after this long (the default is 30 s).
BODY_TIMEOUT_S = 3
# Memory back within this fraction of the warmed-up baseline, after at most SETTLE_S.
MEMORY_TOLERANCE = 0.10
SETTLE_S = 10.0


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class CorpusServer:
    server: ServerProcess
    baseline: int  # VmRSS once warmed up, in bytes
    sent: set[str] = field(default_factory=set)


def request_body(case: dict[str, Any]) -> tuple[bytes | Iterable[bytes], int | None]:
    """The case's body (committed or built), and the builder's header length when it has one."""
    if "file" in case:
        data = (CORPUS / case["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == case["sha256"], f"{case['file']} changed"
        return data, None
    built = make_corpus.BUILDERS[case["build"]]()
    if isinstance(built, tuple):
        body, header_length = built
        return body, header_length
    return built, None


def request_bytes(case: dict[str, Any]) -> Iterator[bytes]:
    """The case as it goes on the wire."""
    body, built_length = request_body(case)
    if case["transport"] == "socket":
        assert isinstance(body, bytes)
        yield body
        return
    lines = [f"POST {case['path']} HTTP/1.1", "Host: corpus", "Connection: close"]
    if "content_type" in case:
        lines.append(f"Content-Type: {case['content_type']}")
    if "header_length" in case:
        value = str(built_length) if case["header_length"] == "auto" else case["header_length"]
        lines.append(f"Inference-Header-Content-Length: {value}")
    if case["transport"] == "chunked":
        lines.append("Transfer-Encoding: chunked")
        # Latin-1, as HTTP carries header bytes ("²" is 0xB2, which isdigit() accepts).
        yield ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        assert not isinstance(body, bytes)
        for chunk in body:
            yield b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        yield b"0\r\n\r\n"
        return
    assert isinstance(body, bytes)
    lines.append(f"Content-Length: {len(body)}")
    yield ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def exchange(port: int, pieces: Iterable[bytes], timeout: float = 60.0) -> Reply:
    """Write ``pieces`` to a new connection (the server may answer and close before the end),
    then read its first response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            for piece in pieces:
                sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered (413) before the body was all sent
        response = http.client.HTTPResponse(sock)
        response.begin()
        try:
            body = response.read()
        except (http.client.IncompleteRead, ConnectionResetError) as exc:
            raise AssertionError(f"the response was cut short: {exc!r}") from None
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, body)


def check_answer(case: dict[str, Any], reply: Reply) -> None:
    where = f"{case['id']} ({case['about']})"
    assert reply.status == case["status"], f"{where}: {reply.status} {reply.body[:300]!r}"
    if not reply.headers.get("content-type", "").startswith("application/json"):
        # Only uvicorn's own refusals of a malformed head are plain text.
        assert reply.status == 400, f"{where}: {reply.headers} {reply.body[:300]!r}"
        assert "code" not in case, where
        return
    body = reply.json()
    if reply.status == 200:
        if case["path"].startswith("/v2"):
            assert body["outputs"], where
        else:
            predictions = body["predictions"]
            assert predictions, where
            assert all(len(p["classes"]) == 5 for p in predictions), where
        return
    assert set(body) == {"error"}, f"{where}: {body}"
    if case["path"].startswith("/v2"):
        assert isinstance(body["error"], str), f"{where}: the /v2 error shape is a string: {body}"
        message = body["error"]
    else:
        assert set(body["error"]) == {"code", "message"}, f"{where}: {body}"
        message = body["error"]["message"]
        if "code" in case:
            assert body["error"]["code"] == case["code"], f"{where}: {body}"
    if "message" in case:
        assert case["message"] in message, f"{where}: {body}"


def assert_cat(http: httpx.Client) -> None:
    response = http.post("/v1/predict", files={"file": ("chelsea.jpg", photo("chelsea.jpg"))})
    assert response.status_code == 200, response.text
    first = response.json()["predictions"][0]["classes"][0]["label"]
    assert first in CAT_CLASSES, response.text


def send(corpus: CorpusServer, case: dict[str, Any]) -> Reply:
    reply = exchange(corpus.server.port, request_bytes(case))
    corpus.sent.add(case["id"])
    return reply


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CorpusServer]:
    """One server for the whole corpus, warmed up: a cat on /v1 and /v2, and every case that
    must be answered 200 sent once, so every decoder and code path has run before the
    baseline is read."""
    log = tmp_path_factory.mktemp("corpus") / "server.log"
    with (
        running_server(log, EVALSERVE_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S)) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        for _ in range(3):
            assert_cat(http)
        for case in CASES:
            if case["status"] == 200:
                check_answer(case, exchange(server.port, request_bytes(case)))
        assert_cat(http)
        time.sleep(1.0)
        baseline = server.memory()
        print(f"\nwarmed-up server: VmRSS {baseline / 2**20:.0f} MB")
        yield CorpusServer(server, baseline)


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_hostile_input_gets_its_answer_and_the_next_good_request_is_served(
    corpus: CorpusServer, case: dict[str, Any]
) -> None:
    started = time.perf_counter()
    check_answer(case, send(corpus, case))
    took = time.perf_counter() - started
    with httpx.Client(base_url=corpus.server.url, timeout=60) as http:
        assert_cat(http)
    print(f"{case['id']}: {case['status']} in {took:.2f}s")


def test_after_the_corpus_memory_is_back_within_10_percent(corpus: CorpusServer) -> None:
    """Run last (it sends whatever cases this session has not, so it also stands alone)."""
    for case in CASES:
        if case["id"] not in corpus.sent:
            send(corpus, case)
    with httpx.Client(base_url=corpus.server.url, timeout=60) as http:
        assert_cat(http)
    limit = corpus.baseline * (1 + MEMORY_TOLERANCE)
    deadline = time.monotonic() + SETTLE_S
    while (rss := corpus.server.memory()) > limit and time.monotonic() < deadline:
        time.sleep(0.5)  # freed arenas go back to the system as the threads settle
    peak = corpus.server.memory("VmHWM")
    print(
        f"VmRSS {corpus.baseline / 2**20:.0f} MB warmed up, {rss / 2**20:.0f} MB after the "
        f"corpus ({(rss / corpus.baseline - 1) * 100:+.1f}%); peak {peak / 2**20:.0f} MB"
    )
    assert rss <= limit, f"VmRSS {rss} is over {limit:.0f} (baseline {corpus.baseline} + 10%)"


def test_the_manifest_is_what_make_corpus_writes() -> None:
    """The committed manifest and files are the generator's (rerun it after changing a case)."""
    expected = [make_corpus.entry(case) for case in make_corpus.cases()]
    assert expected == CASES
    committed = {path.name for path in (CORPUS / "files").iterdir()}
    assert committed == {Path(case["file"]).name for case in CASES if "file" in case}
    assert len(CASES) >= 60
