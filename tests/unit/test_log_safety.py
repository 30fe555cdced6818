"""Logs stay one record per line, whatever a client sends or a library warns: ``logs.configure``
in each format, writing to a captured stderr, with no server."""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from app import logs
from app.api.middleware import Exchange, log_access, printable
from app.lifecycle import Lifecycle

Configure = Callable[[str], io.StringIO]


@pytest.fixture
def configure() -> Iterator[Configure]:
    """``logs.configure("info", fmt)``, its stderr handler pointed at a buffer it returns (pytest
    swaps ``sys.stderr`` between a test's phases); afterwards, logging and the capture of
    warnings as they were."""
    names = ("", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {
        name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level) for name in names
    }
    propagate = {name: logging.getLogger(name).propagate for name in names}

    def configured(fmt: str) -> io.StringIO:
        logs.configure("info", fmt)
        [handler] = logging.getLogger().handlers
        assert isinstance(handler, logging.StreamHandler)
        assert handler.stream is sys.stderr
        stream = io.StringIO()
        handler.setStream(stream)
        return stream

    try:
        yield configured
    finally:
        logging.captureWarnings(False)
        for name, (handlers, level) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate[name]


def test_a_pillow_warning_is_one_json_log_line(
    configure: Configure, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = configure("json")
    Image.new("RGB", (10, 11)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 110 pixels: a bomb warning, no error
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # not the test suite's "error"
        with Image.open(tmp_path / "big.png"):
            pass
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    entry = json.loads(lines[0])
    assert entry["logger"] == "py.warnings"
    assert entry["level"] == "warning"
    assert "DecompressionBombWarning" in entry["message"]


def access_line(path: str) -> None:
    scope = {"method": "GET", "path": path, "client": ("127.0.0.1", 1234)}

    async def nowhere(_: object) -> None:
        raise AssertionError("nothing is sent")

    exchange = Exchange("req-1", nowhere, Lifecycle(), status=404)
    log_access(scope, exchange, 0.001)


FORGED = "/v1/\r\nFAKE LINE 200\x1b[2K\u2028x"


def test_control_characters_in_a_path_stay_on_one_text_access_line(
    configure: Configure,
) -> None:
    stream = configure("text")
    access_line(FORGED)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert not any(line.startswith("FAKE") for line in lines)
    assert '"GET /v1/\\r\\nFAKE LINE 200\\x1b[2K\\u2028x" 404' in lines[0]


def test_json_access_lines_keep_the_exact_path(configure: Configure) -> None:
    stream = configure("json")
    access_line(FORGED)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    entry = json.loads(lines[0])
    assert entry["path"] == FORGED
    assert "\\r\\nFAKE" in entry["message"]


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/v1/models/digits/predict", "/v1/models/digits/predict"),
        ("/v1/café/日本", "/v1/café/日本"),  # printable non-ASCII stays readable
        ("/a\tb\x00c\x7f", "/a\\tb\\x00c\\x7f"),
        ('/q"x', '/q\\"x'),  # a quote cannot end the quoted request field
        ("/a\\r", "/a\\\\r"),  # a backslash is escaped too, so \\r is not read as CR
    ],
)
def test_printable_escapes_what_could_forge_a_line_or_a_field(path: str, logged: str) -> None:
    assert printable(path) == logged
