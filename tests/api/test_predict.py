"""The HTTP API in process, on the real default model: answers, metadata and bad input."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, features
from support import (
    CAT_CLASSES,
    COFFEE_CLASSES,
    DEFAULT_MODEL,
    MODELS,
    jpeg_of,
    make_settings,
    photo,
    png_header_only,
)
from torchvision import transforms

from app.main import create_app
from app.model.repository import load_spec
from app.model.runtime import build_module
from app.preprocessing import ALLOWED_FORMATS


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(make_settings())) as test_client:
        yield test_client


def top_labels(body: dict, image: int = 0) -> list[str]:
    return [c["label"] for c in body["predictions"][image]["classes"]]


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]


def assert_still_serving(client: TestClient) -> None:
    response = client.post("/v1/predict", files={"file": ("cat.jpg", photo("chelsea.jpg"))})
    assert response.status_code == 200, response.text
    assert top_labels(response.json())[0] in CAT_CLASSES


@pytest.mark.parametrize("name", ["chelsea.jpg", "chelsea.png"])
def test_default_model_ranks_a_cat_first_for_chelsea(client: TestClient, name: str) -> None:
    response = client.post("/v1/predict", files={"file": (name, photo(name))})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == DEFAULT_MODEL
    assert body["predictions"][0]["file"] == name
    classes = body["predictions"][0]["classes"]
    assert len(classes) == 5
    assert classes[0]["label"] in CAT_CLASSES
    scores = [c["score"] for c in classes]
    assert scores == sorted(scores, reverse=True)
    assert 0.0 < sum(scores) <= 1.0 + 1e-6


@pytest.mark.parametrize("name", ["coffee.jpg", "coffee.png"])
def test_default_model_sees_espresso_or_cup_in_coffee(client: TestClient, name: str) -> None:
    response = client.post(f"/v1/models/{DEFAULT_MODEL}/predict", files={"file": photo(name)})
    assert response.status_code == 200, response.text
    assert top_labels(response.json())[0] in COFFEE_CLASSES


def test_raw_image_body_is_accepted(client: TestClient) -> None:
    response = client.post(
        "/v1/predict", content=photo("chelsea.jpg"), headers={"Content-Type": "image/jpeg"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["predictions"][0]["file"] == "body"
    assert top_labels(body)[0] in CAT_CLASSES


def avif_of(data: bytes) -> bytes:
    """The photo re-encoded as AVIF by Pillow; skips where this Pillow cannot write AVIF."""
    if not features.check("avif"):
        pytest.skip("this Pillow has no libavif, so it cannot write an AVIF photo to send")
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(data)) as image:
        image.save(buffer, "AVIF", quality=80)
    avif = buffer.getvalue()
    assert avif[4:12] == b"ftypavif"
    return avif


@pytest.mark.parametrize("how", ["multipart", "raw-body"])
def test_avif_photo_of_chelsea_is_classified_as_a_cat(client: TestClient, how: str) -> None:
    data = avif_of(photo("chelsea.jpg"))
    if how == "multipart":
        response = client.post("/v1/predict", files={"file": ("chelsea.avif", data, "image/avif")})
    else:
        response = client.post("/v1/predict", content=data, headers={"Content-Type": "image/avif"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["predictions"][0]["file"] == ("chelsea.avif" if how == "multipart" else "body")
    assert top_labels(body)[0] in CAT_CLASSES


# The start of an iPhone photo: an ISO-BMFF 'ftyp' box with the HEVC still-image brands.
HEIC_START = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64


@pytest.mark.parametrize("content_type", ["image/heic", "image/heif"])
def test_heic_body_this_pillow_cannot_decode_is_400_naming_the_accepted_formats(
    client: TestClient, content_type: str
) -> None:
    if "HEIF" in ALLOWED_FORMATS:
        pytest.skip("a HEIF plugin (pillow-heif) is registered here, so HEIC is accepted")
    response = client.post(
        "/v1/predict", content=HEIC_START, headers={"Content-Type": content_type}
    )
    error = assert_error(response, 400, "invalid_image")  # accepted as a type, refused as data
    assert error["message"].startswith("body: not a supported image (JPEG, PNG, WebP, BMP, GIF")
    assert ("AVIF" in error["message"]) == bool(features.check("avif"))
    assert "HEIF" not in error["message"]
    assert_still_serving(client)


def test_several_files_come_back_in_upload_order(client: TestClient) -> None:
    files = [
        ("file", ("a-coffee.jpg", photo("coffee.jpg"))),
        ("file", ("b-cat.jpg", photo("chelsea.jpg"))),
        ("file", ("c-coffee.png", photo("coffee.png"))),
    ]
    response = client.post("/v1/predict?top_k=2", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [p["file"] for p in body["predictions"]] == ["a-coffee.jpg", "b-cat.jpg", "c-coffee.png"]
    assert top_labels(body, 0)[0] in COFFEE_CLASSES
    assert top_labels(body, 1)[0] in CAT_CLASSES
    assert top_labels(body, 2)[0] in COFFEE_CLASSES
    assert all(len(p["classes"]) == 2 for p in body["predictions"])


def test_served_scores_equal_an_in_process_reference(client: TestClient) -> None:
    """The same weights in eval mode with torchvision's own transforms, no server in between."""
    spec = load_spec(MODELS / DEFAULT_MODEL)
    model = build_module(spec).eval()
    pre = spec.preprocessing
    reference = transforms.Compose(
        [
            transforms.Resize(pre.resize, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(pre.crop),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )
    for name in ["chelsea.jpg", "coffee.png", "camera.jpg"]:
        image = Image.open(io.BytesIO(photo(name))).convert("RGB")
        with torch.inference_mode():
            expected = torch.softmax(model(reference(image)[None]), dim=1)[0]
        response = client.post("/v1/predict?top_k=1000", files={"file": (name, photo(name))})
        assert response.status_code == 200, response.text
        served = torch.zeros(1000)
        for entry in response.json()["predictions"][0]["classes"]:
            served[entry["index"]] = entry["score"]
        assert torch.allclose(served, expected, atol=1e-5, rtol=0), (
            f"{name}: max difference {(served - expected).abs().max().item():.2e}"
        )


def test_top_k_controls_how_many_classes_come_back(client: TestClient) -> None:
    response = client.post("/v1/predict?top_k=1", files={"file": photo("chelsea.jpg")})
    assert response.status_code == 200
    assert len(response.json()["predictions"][0]["classes"]) == 1


@pytest.mark.parametrize("top_k", ["0", "-3", "1001", "many"])
def test_bad_top_k_is_422(client: TestClient, top_k: str) -> None:
    response = client.post(f"/v1/predict?top_k={top_k}", files={"file": photo("chelsea.jpg")})
    error = assert_error(response, 422, "invalid_parameter")
    assert "top_k" in error["message"]


def test_model_list_and_metadata(client: TestClient) -> None:
    listing = client.get("/v1/models")
    assert listing.status_code == 200
    names = [m["name"] for m in listing.json()["models"]]
    assert DEFAULT_MODEL in names
    info = client.get(f"/v1/models/{DEFAULT_MODEL}").json()
    assert info["num_classes"] == 1000
    assert info["input_size"] == [3, 224, 224]
    assert info["default"] is True
    assert info["device"] == "cpu"
    assert info["dtype"] == "float32"
    assert info["batching"] == {
        "max_batch_size": 16,
        "max_batch_delay_ms": 5.0,
        "max_queue_size": 256,
    }


def test_unknown_model_is_404(client: TestClient) -> None:
    error = assert_error(client.get("/v1/models/nope"), 404, "model_not_found")
    assert DEFAULT_MODEL in error["message"]
    response = client.post("/v1/models/nope/predict", files={"file": photo("chelsea.jpg")})
    assert_error(response, 404, "model_not_found")


def test_health_probes(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "live"}
    assert client.get("/health/ready").json() == {"status": "ready"}


def test_openapi_docs_describe_predict(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/predict"]["post"]
    assert "multipart/form-data" in operation["requestBody"]["content"]
    assert {"200", "400", "413", "415", "503", "504"} <= set(operation["responses"])


def test_unknown_route_uses_the_error_shape(client: TestClient) -> None:
    assert_error(client.get("/v9/nothing"), 404, "not_found")
    # Under /v2, the Open Inference Protocol's own shape.
    response = client.get("/v2/nothing")
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found"}


# --- bad input: a clear error naming the problem, and the server keeps serving ---------------


def test_text_file_named_jpg_is_400_naming_the_file(client: TestClient) -> None:
    files = [
        ("file", ("good.jpg", photo("chelsea.jpg"))),
        ("file", ("notes.jpg", b"this is not an image\n")),
    ]
    error = assert_error(client.post("/v1/predict", files=files), 400, "invalid_image")
    assert "notes.jpg" in error["message"]
    assert_still_serving(client)


def test_truncated_jpeg_is_400_naming_the_file(client: TestClient) -> None:
    data = photo("chelsea.jpg")
    files = {"file": ("half.jpg", data[: len(data) // 2])}
    error = assert_error(client.post("/v1/predict", files=files), 400, "invalid_image")
    assert "half.jpg" in error["message"]
    assert "truncated" in error["message"]
    assert_still_serving(client)


def test_truncated_png_raw_body_is_400(client: TestClient) -> None:
    data = photo("coffee.png")
    response = client.post(
        "/v1/predict", content=data[: len(data) // 3], headers={"Content-Type": "image/png"}
    )
    error = assert_error(response, 400, "invalid_image")
    assert error["message"].startswith("body:")
    assert_still_serving(client)


def test_empty_file_is_400(client: TestClient) -> None:
    error = assert_error(
        client.post("/v1/predict", files={"file": ("empty.png", b"")}), 400, "invalid_image"
    )
    assert "empty.png" in error["message"]


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/json", "application/x-www-form-urlencoded"]
)
def test_unsupported_content_type_is_415(client: TestClient, content_type: str) -> None:
    response = client.post("/v1/predict", content=b"hello", headers={"Content-Type": content_type})
    assert_error(response, 415, "unsupported_media_type")
    assert_still_serving(client)


def test_missing_content_type_is_415(client: TestClient) -> None:
    assert_error(client.post("/v1/predict", content=b"hello"), 415, "unsupported_media_type")


def test_multipart_without_file_field_is_400(client: TestClient) -> None:
    response = client.post("/v1/predict", files={"image": ("cat.jpg", photo("chelsea.jpg"))})
    error = assert_error(response, 400, "bad_request")
    assert "'file'" in error["message"]
    response = client.post("/v1/predict", data={"file": "not a file"}, files={"x": ("a", b"b")})
    assert_error(response, 400, "bad_request")


def test_body_over_the_upload_limit_is_413(client: TestClient) -> None:
    big = b"\xff" * (20 * 1024 * 1024 + 1)
    response = client.post("/v1/predict", content=big, headers={"Content-Type": "image/jpeg"})
    error = assert_error(response, 413, "payload_too_large")
    assert "limit" in error["message"]
    assert_still_serving(client)


def test_streamed_body_over_the_limit_is_413_without_content_length(client: TestClient) -> None:
    chunk = b"\x00" * (1024 * 1024)

    def body():
        for _ in range(25):
            yield chunk

    response = client.post("/v1/predict", content=body(), headers={"Content-Type": "image/png"})
    assert_error(response, 413, "payload_too_large")
    assert_still_serving(client)


def test_image_over_the_pixel_limit_is_413(client: TestClient) -> None:
    # 8000 x 6000 = 48 MP: over the 40 MP default, under Pillow's own bomb threshold.
    files = {"file": ("huge.png", png_header_only(8000, 6000))}
    error = assert_error(client.post("/v1/predict", files=files), 413, "payload_too_large")
    assert "huge.png" in error["message"]
    assert_still_serving(client)


def test_decompression_bomb_is_413(client: TestClient) -> None:
    files = {"file": ("bomb.png", png_header_only(30000, 30000))}
    assert_error(client.post("/v1/predict", files=files), 413, "payload_too_large")
    assert_still_serving(client)


def test_more_images_than_the_queue_holds_is_413(client: TestClient) -> None:
    tiny = jpeg_of(Image.new("RGB", (8, 8), "red"))
    files = [("file", (f"{i}.jpg", tiny)) for i in range(257)]
    error = assert_error(client.post("/v1/predict", files=files), 413, "payload_too_large")
    assert "queue" in error["message"]
    assert_still_serving(client)
