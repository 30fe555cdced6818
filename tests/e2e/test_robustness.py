"""Hostile and extreme input: what the OpenAPI schema promises, what corrupt uploads get, images
of extreme shape, and a burst of requests far over the queue's capacity.

The schemathesis and corrupt-upload tests drive the ASGI app in process (real models, lifespan
running), for speed. The extreme-shape and overload tests talk to a real server subprocess over
127.0.0.1, so they can read its memory and see its real connection handling.
"""

from __future__ import annotations

import asyncio
import functools
import io
import struct
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import numpy as np
import pytest
import requests
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from support import (
    CAT_CLASSES,
    DEFAULT_MODEL,
    MODELS,
    ServerProcess,
    fixture,
    make_settings,
    metric,
    photo,
    png_header_only,
    running_server,
)

from app.main import create_app

# What a test sees: a real client's answer (httpx) or the in-process TestClient's (httpx2).
Response = httpx.Response | httpx2.Response

pytestmark = pytest.mark.e2e

EXIF_ORIENTATION = 0x0112
ERROR_CODES = {400: "invalid_image", 413: "payload_too_large"}

# Pillow reports some damage with a warning and carries on rather than raising: corrupt EXIF
# (PIL.TiffImagePlugin: "Corrupt EXIF data", "Tag data larger than file", "Truncated File Read")
# and headers claiming 89-179 megapixels (DecompressionBombWarning, before the server's own,
# lower pixel limit answers 413). In production those are printed once and the request is
# answered normally. Under pytest's `filterwarnings = error` they would turn into exceptions in
# the server's decode threads (the filters are process-wide) and into 500s that production never
# gives, so the tests that feed the in-process app corrupt images ignore exactly these.
PILLOW_CARRIES_ON = (
    pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin"),
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
)


def with_pillow_warnings_ignored(test: Any) -> Any:
    for mark in PILLOW_CARRIES_ON:
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    """The app in process with its lifespan running: both real models loaded and warmed."""
    with TestClient(create_app(make_settings()), raise_server_exceptions=False) as test_client:
        yield test_client


def assert_error_shape(response: Response) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    if response.request.url.path.startswith("/v2"):
        # The Open Inference Protocol's own shape: {"error": "message"}.
        assert isinstance(error, str), body
        assert error, body
        return {"code": "", "message": error}
    assert set(error) == {"code", "message"}, body
    assert isinstance(error["code"], str), body
    assert error["code"], body
    assert isinstance(error["message"], str), body
    assert error["message"], body
    return error


def assert_cat_first(response: Response) -> None:
    assert response.status_code == 200, response.text
    classes = response.json()["predictions"][0]["classes"]
    assert len(classes) == 5
    assert classes[0]["label"] in CAT_CLASSES, classes


def assert_still_serving(client: TestClient) -> None:
    """The next good request after a hostile one: chelsea.jpg is still a cat."""
    response = client.post("/v1/predict", files={"file": ("chelsea.jpg", photo("chelsea.jpg"))})
    assert_cat_first(response)


# --------------------------------------------------------------------------------------------
# 1. schemathesis: every operation of the app's own OpenAPI schema, positive and negative data.
# --------------------------------------------------------------------------------------------

SCHEMA_EXAMPLES = 40
# Only checks that judge the response in hand: none of them sends further requests of its own.
SCHEMA_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,  # schema-invalid input (negative mode) must get a 4xx
]


@functools.cache
def documented_paths() -> dict[str, Any]:
    """The paths of the app's OpenAPI schema, read at collection (no model loads for it)."""
    paths: dict[str, Any] = create_app(make_settings()).openapi()["paths"]
    return paths


def schema_operations() -> list[tuple[str, str]]:
    """(METHOD, path) of every operation the app documents."""
    return [(method.upper(), path) for path, item in documented_paths().items() for method in item]


def schema_runs() -> list[Any]:
    """One run per documented operation and generation mode, read from the app's schema at
    collection (no models load). Operations on ``{name}`` run three times: with generated names
    (all 404) and with each served model's name, so the model's own code paths are reached too.
    Negative data needs an input that can be made invalid; a string path parameter (a model
    name or version) cannot (any string is one), so operations with no other input get
    positive runs only."""
    runs = []
    for path, item in documented_paths().items():
        for method, operation in item.items():
            inputs = {p["name"] for p in operation.get("parameters", [])}
            if "requestBody" in operation:
                inputs.add("(body)")
            for model in [None, *((DEFAULT_MODEL, "digits") if "{name}" in path else ())]:
                breakable = inputs - {"name", "version"}  # free strings: nothing is invalid
                for mode in ("positive", "negative") if breakable else ("positive",):
                    label = f"{method.upper()} {path}{f' name={model}' if model else ''} {mode}"
                    runs.append(pytest.param(method.upper(), path, model, mode, id=label))
    return runs


@pytest.fixture(scope="module")
def api_schema(client: TestClient) -> Any:
    """The schema the running app serves. Loaded from the dict rather than with
    ``schemathesis.openapi.from_asgi``: from_asgi (schemathesis 4) starts the app's lifespan in
    its own event loop, which would load every model a second time beside the TestClient's."""
    response = client.get("/openapi.json")
    assert response.status_code == 200, response.text
    return schemathesis.openapi.from_dict(response.json())


TRANSPORT_KWARGS = {"method", "url", "headers", "params", "cookies", "files", "data", "json"}


def send_case(client: TestClient, case: Any, headers: dict[str, str] | None = None) -> Response:
    """Send a generated case through the in-process app, byte for byte as schemathesis would.

    schemathesis serialises a case into ``requests`` arguments (multipart included); requests
    prepares the exact body and headers, and the TestClient delivers them to the ASGI app.
    """
    kwargs = case.as_transport_kwargs(base_url="http://testserver", headers=headers)
    assert set(kwargs) <= TRANSPORT_KWARGS, f"unexpected transport arguments: {set(kwargs)}"
    prepared = requests.Request(
        method=kwargs["method"],
        url=kwargs["url"],
        headers=kwargs.get("headers"),
        params=kwargs.get("params"),
        cookies=kwargs.get("cookies"),
        files=kwargs.get("files"),
        data=kwargs.get("data"),
        json=kwargs.get("json"),
    ).prepare()
    body = prepared.body or b""
    if isinstance(body, str):
        body = body.encode()
    assert prepared.method is not None
    assert prepared.url is not None
    assert isinstance(body, bytes)  # requests prepares files and forms into bytes
    headers = {k: v if isinstance(v, str) else v.decode() for k, v in prepared.headers.items()}
    return client.request(prepared.method, prepared.url, content=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "model", "mode"), schema_runs())
@with_pillow_warnings_ignored
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    client: TestClient, api_schema: Any, method: str, path: str, model: str | None, mode: str
) -> None:
    operation = api_schema[path][method]
    strategy = operation.as_strategy(
        generation_mode=schemathesis.GenerationMode(mode),
        path_parameters={"name": model} if model else None,
    )
    statuses: Counter[int] = Counter()

    @settings(max_examples=SCHEMA_EXAMPLES, deadline=None, database=None)
    @given(case=strategy)
    def check(case: Any) -> None:
        response = send_case(client, case)
        statuses[response.status_code] += 1
        assert response.status_code < 500, f"{case.as_curl_command()}\n-> {response.text}"
        if response.status_code >= 400:
            assert_error_shape(response)
        case.validate_response(response, checks=SCHEMA_CHECKS)

    check()
    where = f" name={model}" if model else ""
    print(f"schemathesis {method} {path}{where} {mode}: {dict(sorted(statuses.items()))}")
    assert_still_serving(client)


API_KEY = "robustness-test-key"


@pytest.fixture(scope="module")
def keyed_client() -> Iterator[TestClient]:
    """The app with EVALSERVE_API_KEYS set (README: predict and model routes then need a key)."""
    app = create_app(make_settings(api_keys=API_KEY))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def undeclared_refusals(client: TestClient, schema: Any, method: str, path: str) -> dict[str, str]:
    """Send generated cases for one operation without a key, with a wrong one and with the
    right one; return the answers that fail schemathesis's checks, and why."""
    operation = schema[path][method]
    model = {"name": "digits"} if "{name}" in path else None
    undeclared: dict[str, str] = {}

    @settings(max_examples=3, deadline=None, database=None)
    @given(case=operation.as_strategy(path_parameters=model))
    def check(case: Any) -> None:
        for authorization, refusal in ((None, 401), ("Bearer not-the-key", 403)):
            headers = {"Authorization": authorization} if authorization else None
            response = send_case(client, case, headers)
            if path.startswith("/v1/"):
                assert response.status_code == refusal, response.text
                assert assert_error_shape(response)["code"] in {"unauthorized", "forbidden"}
            try:
                case.validate_response(response, checks=SCHEMA_CHECKS)
            except BaseExceptionGroup as failures:
                titles = sorted({str(f).strip().splitlines()[0] for f in failures.exceptions})
                undeclared[f"{method} {path} -> {response.status_code}"] = "; ".join(titles)
        right = send_case(client, case, {"Authorization": f"Bearer {API_KEY}"})
        assert right.status_code not in {401, 403}, right.text
        assert right.status_code < 500, right.text

    check()
    return undeclared


def test_with_api_keys_on_the_refusals_are_in_the_schema_too(keyed_client: TestClient) -> None:
    """Without a key (401) or with a wrong one (403), every /v1 operation refuses, and the
    schema the server publishes must declare that answer, as it does for predict."""
    response = keyed_client.get("/openapi.json")
    assert response.status_code == 200, response.text
    schema = schemathesis.openapi.from_dict(response.json())
    undeclared: dict[str, str] = {}
    for method, path in schema_operations():
        undeclared |= undeclared_refusals(keyed_client, schema, method, path)
    assert not undeclared, "answers the schema does not declare:\n" + "\n".join(
        f"  {where}: {why}" for where, why in sorted(undeclared.items())
    )


# --------------------------------------------------------------------------------------------
# 2. Hostile uploads: a deterministic corpus, then hypothesis on flip and cut positions.
# --------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@functools.cache
def base_images() -> dict[str, tuple[bytes, str]]:
    """name -> (good file, its Content-Type): committed photographs and Pillow-made images of
    every format under test (JPEG, PNG, GIF, WebP) in the modes and variants uploads come in."""
    with Image.open(fixture("chelsea.jpg")) as cat:
        small = cat.convert("RGB").resize((113, 75))
    frames = [small, small.rotate(90), small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # rotated: the server applies it with exif_transpose
    gray16 = Image.fromarray(np.asarray(small.convert("L")).astype(np.uint16) * 257)
    assert gray16.mode == "I;16"
    return {
        "chelsea.jpg": (photo("chelsea.jpg"), "image/jpeg"),
        "chelsea.png": (photo("chelsea.png"), "image/png"),
        "camera.jpg": (photo("camera.jpg"), "image/jpeg"),  # grayscale
        "progressive.jpg": (encode(small, "JPEG", progressive=True), "image/jpeg"),
        "exif.jpg": (encode(small, "JPEG", exif=exif), "image/jpeg"),
        "cmyk.jpg": (encode(small.convert("CMYK"), "JPEG"), "image/jpeg"),
        "rgba.png": (encode(small.convert("RGBA"), "PNG"), "image/png"),
        "gray16.png": (encode(gray16, "PNG"), "image/png"),
        "palette.png": (encode(small.convert("P"), "PNG", transparency=0), "image/png"),
        "palette.gif": (encode(small.convert("P"), "GIF"), "image/gif"),
        "transparent.gif": (encode(small.convert("P"), "GIF", transparency=0), "image/gif"),
        "animated.gif": (
            encode(frames[0].convert("P"), "GIF", save_all=True, append_images=frames[1:]),
            "image/gif",
        ),
        "lossy.webp": (encode(small, "WEBP", quality=80), "image/webp"),
        "lossless.webp": (encode(small, "WEBP", lossless=True), "image/webp"),
        "animated.webp": (
            encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100),
            "image/webp",
        ),
    }


def pillow_reads(data: bytes) -> bool:
    """Whether Pillow itself decodes every pixel of ``data`` (the reference for a cut file)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                image.load()
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class Hostile:
    name: str
    data: bytes
    content_type: str
    allowed: frozenset[int]


def flip(data: bytes, *bits: tuple[int, int]) -> bytes:
    out = bytearray(data)
    for position, bit in bits:
        out[position] ^= 1 << bit
    return bytes(out)


def hostile_corpus() -> list[Hostile]:
    refused = frozenset({400})
    may_decode = frozenset({200, 400, 413})
    corpus = []
    for name, (data, content_type) in base_images().items():
        size = len(data)
        corpus.append(Hostile(f"empty-{name}", b"", content_type, refused))
        # Cuts inside the header and the pixel data. Only an animated GIF cut after its first
        # frame still decodes (the server reads the first frame, as documented): Pillow decides.
        for cut in (1, 8, 16, 64, size // 4, size // 2, 3 * size // 4):
            allowed = may_decode if pillow_reads(data[:cut]) else refused
            corpus.append(Hostile(f"cut{cut}-{name}", data[:cut], content_type, allowed))
        for position in (2, 12, 24, 40, size // 3, size // 2, 2 * size // 3):
            corpus.append(
                Hostile(
                    f"flip{position}-{name}", flip(data, (position, 3)), content_type, may_decode
                )
            )
        corpus.append(
            Hostile(
                f"flip-many-{name}",
                flip(data, *((p, p % 8) for p in range(16, size, max(1, size // 16)))),
                content_type,
                may_decode,
            )
        )
    for kind in ("jpeg", "png", "gif", "webp"):
        text = b"plain text, not an image"
        corpus.append(Hostile(f"notes-as-{kind}.{kind}", text, f"image/{kind}", refused))
    corpus += [
        Hostile("page.png", b"<!doctype html><title>x</title>", "image/png", refused),
        Hostile(
            "doc.jpg", b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", "application/octet-stream", refused
        ),
        Hostile("magic-only.gif", b"GIF89a", "image/gif", refused),
        Hostile("magic-only.png", b"\x89PNG\r\n\x1a\n", "image/png", refused),
        Hostile("magic-only.jpg", b"\xff\xd8\xff", "image/jpeg", refused),
        Hostile("magic-only.webp", b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp", refused),
        Hostile("bomb.png", png_header_only(30000, 30000), "image/png", frozenset({413})),
    ]
    return corpus


def assert_hostile_answer(response: Response, case: Hostile, file: str) -> None:
    assert response.status_code in case.allowed, (
        f"{case.name} ({len(case.data)} bytes) got {response.status_code}: {response.text}"
    )
    if response.status_code == 200:
        assert len(response.json()["predictions"][0]["classes"]) == 5
        return
    error = assert_error_shape(response)
    assert error["code"] == ERROR_CODES[response.status_code], error
    assert file in error["message"], error


def post_raw(client: TestClient, case: Hostile) -> Response:
    return client.post(
        "/v1/predict", content=case.data, headers={"Content-Type": case.content_type}
    )


def post_multipart(client: TestClient, case: Hostile) -> Response:
    return client.post("/v1/predict", files={"file": (case.name, case.data, case.content_type)})


@with_pillow_warnings_ignored
@pytest.mark.parametrize("case", hostile_corpus(), ids=lambda case: case.name)
def test_hostile_upload_gets_4xx_and_the_next_good_request_succeeds(
    client: TestClient, case: Hostile
) -> None:
    assert_hostile_answer(post_raw(client, case), case, "body")
    assert_still_serving(client)
    assert_hostile_answer(post_multipart(client, case), case, case.name)
    assert_still_serving(client)


def test_a_bad_file_among_good_ones_fails_the_request_and_names_the_bad_one(
    client: TestClient,
) -> None:
    data = photo("chelsea.jpg")
    response = client.post(
        "/v1/predict",
        files=[
            ("file", ("good.jpg", data, "image/jpeg")),
            ("file", ("half.jpg", data[: len(data) // 2], "image/jpeg")),
            ("file", ("also-good.jpg", data, "image/jpeg")),
        ],
    )
    assert response.status_code == 400, response.text
    error = assert_error_shape(response)
    assert error["code"] == "invalid_image", error
    assert "half.jpg" in error["message"], error
    assert_still_serving(client)


@st.composite
def damaged(draw: st.DrawFn, *, cut: bool) -> Hostile:
    name = draw(st.sampled_from(sorted(base_images())))
    data, content_type = base_images()[name]
    header = min(len(data), 512)
    # Half the positions fall in the first 512 bytes, where headers and chunk tables live.
    position = st.one_of(st.integers(0, header - 1), st.integers(0, len(data) - 1))
    if cut:
        at = draw(position)
        damaged_data = data[:at]
        readable = pillow_reads(damaged_data)
        allowed = frozenset({200, 400, 413} if readable else {400, 413})
        return Hostile(f"cut{at}-{name}", damaged_data, content_type, allowed)
    flips = draw(st.lists(st.tuples(position, st.integers(0, 7)), min_size=1, max_size=8))
    positions = "-".join(str(p) for p, _ in flips)
    return Hostile(
        f"flip{positions}-{name}", flip(data, *flips), content_type, frozenset({200, 400, 413})
    )


@with_pillow_warnings_ignored
@pytest.mark.parametrize("cut", [False, True], ids=["bit-flipped", "truncated"])
def test_damaged_uploads_never_get_a_5xx(client: TestClient, cut: bool) -> None:
    statuses: Counter[int] = Counter()

    @settings(max_examples=60, deadline=None, database=None)
    @given(case=damaged(cut=cut), multipart=st.booleans())
    def check(case: Hostile, multipart: bool) -> None:
        if multipart:
            response = post_multipart(client, case)
            assert_hostile_answer(response, case, case.name)
        else:
            response = post_raw(client, case)
            assert_hostile_answer(response, case, "body")
        statuses[response.status_code] += 1
        assert_still_serving(client)

    check()
    print(f"{'truncated' if cut else 'bit-flipped'} uploads: {dict(sorted(statuses.items()))}")


# --------------------------------------------------------------------------------------------
# 3. Extreme shapes: 1x1 in process; 20000x1 strips against a real server, watching its memory.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("model", [DEFAULT_MODEL, "digits"])
def test_a_1x1_image_is_valid(client: TestClient, fmt: str, model: str) -> None:
    data = encode(Image.new("RGB", (1, 1), (200, 120, 40)), fmt)
    response = client.post(
        f"/v1/models/{model}/predict", files={"file": (f"dot.{fmt.lower()}", data)}
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"][0]["classes"]) == 5


def no_resize_repository(root: Path) -> Path:
    """The real models, plus ``digits_noresize``: the digits network with a crop and no resize."""
    repo = root / "models"
    for name in (DEFAULT_MODEL, "digits"):
        target = repo / name
        target.mkdir(parents=True)
        for path in (MODELS / name).iterdir():
            if path.is_file():
                (target / path.name).write_bytes(path.read_bytes())
    plain = repo / "digits_noresize"
    plain.mkdir()
    for file in ("model.pt2", "labels.txt"):
        (plain / file).write_bytes((MODELS / "digits" / file).read_bytes())
    (plain / "model.toml").write_text(
        '[model]\nsource = "export"\nfile = "model.pt2"\n\n[labels]\nfile = "labels.txt"\n\n'
        '[preprocessing]\ncrop = 8\ninterpolation = "bilinear"\ncolor_mode = "L"\n'
        "mean = [0.305051]\nstd = [0.375679]\n"
    )
    return repo


def strip(width: int, height: int, fmt: str = "PNG") -> bytes:
    """A gradient strip, so the crop the server takes from it is not blank."""
    image = Image.new("RGB", (width, height))
    image.putdata([(i % 256, (i * 7) % 256, 255 - i % 256) for i in range(width * height)])
    return encode(image, fmt)


@pytest.fixture(scope="module")
def strip_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("strips")
    repo = no_resize_repository(root)
    with running_server(root / "server.log", EVALSERVE_MODEL_REPOSITORY=str(repo)) as server:
        yield server


def test_extreme_aspect_ratios_are_answered_in_bounded_memory(strip_server: ServerProcess) -> None:
    with httpx.Client(base_url=strip_server.url, timeout=120) as http:
        info = http.get("/v1/models/digits_noresize").json()
        assert info["preprocessing"]["resize"] is None, info
        # Warm both code paths with ordinary images before taking the baseline.
        for model in (DEFAULT_MODEL, "digits_noresize"):
            response = http.post(
                f"/v1/models/{model}/predict", files={"file": ("chelsea.jpg", photo("chelsea.jpg"))}
            )
            assert response.status_code == 200, response.text
        before = strip_server.memory("VmHWM")
        cases = [
            (DEFAULT_MODEL, "wide.png", strip(20000, 1)),
            (DEFAULT_MODEL, "tall.png", strip(1, 20000)),
            (DEFAULT_MODEL, "wide.jpg", strip(20000, 1, "JPEG")),
            ("digits", "wide.png", strip(20000, 1)),
            ("digits_noresize", "wide.png", strip(20000, 1)),
            ("digits_noresize", "tall.png", strip(1, 20000)),
        ]
        for model, name, data in cases:
            response = http.post(f"/v1/models/{model}/predict", files={"file": (name, data)})
            assert response.status_code == 200, f"{model} {name}: {response.text}"
            assert len(response.json()["predictions"][0]["classes"]) == 5
        after = strip_server.memory("VmHWM")
    grown = (after - before) / 2**20
    print(f"server peak RSS (VmHWM): {before / 2**20:.0f} MB -> {after / 2**20:.0f} MB")
    # A naive resize of 20000x1 to a 256-pixel short side is 5,120,000x256 RGB: about 3.9 GB.
    assert grown < 500, f"peak resident memory grew by {grown:.0f} MB"


def corrupt_exif_jpeg() -> bytes:
    """A JPEG whose EXIF directory claims 9 entries and holds 1 (orientation 6): Pillow warns
    ("Corrupt EXIF data") and still reads the orientation."""
    entry = struct.pack(">HHIHH", EXIF_ORIENTATION, 3, 1, 6, 0)
    exif = b"Exif\x00\x00MM\x00*" + struct.pack(">IH", 8, 9) + entry + b"\x00" * 4
    with Image.open(fixture("chelsea.jpg")) as cat:
        return encode(cat.convert("RGB"), "JPEG", exif=exif)


def test_damage_pillow_only_warns_about_is_answered_normally_by_a_real_server(
    strip_server: ServerProcess,
) -> None:
    """Why PILLOW_CARRIES_ON is right: where warnings are not errors, as in production, these
    uploads get their ordinary answers, not a 500."""
    with httpx.Client(base_url=strip_server.url, timeout=60) as http:
        response = http.post(
            "/v1/predict", files={"file": ("exif.jpg", corrupt_exif_jpeg(), "image/jpeg")}
        )
        assert_cat_first(response)
        # 10000x10000 is over Pillow's warning threshold (89.5 MP), under its error threshold.
        response = http.post(
            "/v1/predict",
            content=png_header_only(10000, 10000),
            headers={"Content-Type": "image/png"},
        )
        assert response.status_code == 413, response.text
        assert assert_error_shape(response)["code"] == "payload_too_large"


# --------------------------------------------------------------------------------------------
# 4. Overload: 200 concurrent requests against a queue of 4.
# --------------------------------------------------------------------------------------------


async def burst(url: str, count: int) -> tuple[list[httpx.Response], list[int]]:
    """``count`` simultaneous predictions, with readiness polled on its own connection meanwhile."""
    data = photo("chelsea.jpg")
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    done = asyncio.Event()
    ready: list[int] = []

    async def poll_ready() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as probe:
            while not done.is_set():
                ready.append((await probe.get("/health/ready")).status_code)
                await asyncio.sleep(0.05)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        poller = asyncio.create_task(poll_ready())
        try:
            responses = await asyncio.gather(
                *(
                    http.post("/v1/predict", files={"file": (f"cat{i}.jpg", data)})
                    for i in range(count)
                )
            )
        finally:
            done.set()
            await poller
    return responses, ready


def test_overload_is_answered_503_with_retry_after_and_nothing_breaks(tmp_path: Path) -> None:
    with running_server(
        tmp_path / "server.log", EVALSERVE_MAX_QUEUE_SIZE="4", EVALSERVE_MAX_BATCH_SIZE="2"
    ) as server:
        responses, ready = asyncio.run(burst(server.url, 200))
        statuses = Counter(r.status_code for r in responses)
        ok, overloaded = statuses[200], statuses[503]
        print(f"overload: {ok} x 200, {overloaded} x 503 of {len(responses)}; readiness {ready}")
        assert set(statuses) <= {200, 503}, statuses
        assert ok > 0, statuses
        assert overloaded > 0, statuses
        for response in responses:
            if response.status_code == 503:
                assert response.headers.get("Retry-After") == "1", response.headers
                assert assert_error_shape(response)["code"] == "overloaded"
            else:
                assert response.json()["predictions"][0]["classes"][0]["label"] in CAT_CLASSES
        assert ready, ready
        assert set(ready) == {200}, ready
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.get("/health/ready").status_code == 200
            after = http.post("/v1/predict", files={"file": ("cat.jpg", photo("chelsea.jpg"))})
            assert_cat_first(after)
            text = http.get("/metrics").text
    model = {"model": DEFAULT_MODEL}
    rejected = metric(text, "evalserve_images_rejected_total", **model, reason="queue_full")
    processed = metric(text, "evalserve_images_processed_total", **model)
    print(f"metrics: rejected queue_full {rejected:.0f}, processed {processed:.0f}")
    assert rejected == overloaded
    assert processed >= ok + 1  # the burst's 200s and the single request after it
