"""The GPU path on a GPU: nvJPEG batch decode and its per-image fallback, staging in pinned
buffers reused batch after batch, CUDA graphs (compile's reduce-overhead) captured at warm-up
and never recompiled while serving. Skipped without CUDA (tests/conftest.py); the CPU side of
each runs everywhere (tests/unit/test_device_decode.py, test_staging_buffers.py,
test_batch_pipeline.py, tests/api/test_device_decode_serving.py). bench/gpu_check.sh runs
these with ``pytest -m cuda``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient
from support import (
    CAT_CLASSES,
    DEFAULT_MODEL,
    MODELS,
    PHOTOS,
    classifier_of,
    device_jpeg,
    make_settings,
    web_jpeg,
)

from app.main import create_app
from app.model.repository import discover
from app.model.runtime import Classifier
from app.preprocessing import BadImage, load_image
from app.values import Item, TopK

pytestmark = pytest.mark.cuda
MAX_PIXELS = 40_000_000


@pytest.fixture(scope="module")
def gpu_classifier() -> Iterator[Classifier]:
    spec = discover(MODELS, DEFAULT_MODEL)[DEFAULT_MODEL]
    model = Classifier(spec, torch.device("cuda"), None, max_batch_size=16)
    try:
        yield model
    finally:
        model.close()


def test_a_cuda_model_decodes_jpegs_with_nvjpeg_and_agrees_with_the_cpu_path(
    gpu_classifier: Classifier,
) -> None:
    decoder = gpu_classifier.device_decoder
    assert decoder is not None  # [preprocessing] gpu_decode is on by default on CUDA
    before = decoder.decoded
    uploads = [web_jpeg(name) for name in PHOTOS]
    on_gpu = gpu_classifier.predict_blocking(
        [Item(device_jpeg(d, gpu_classifier.transform), 5) for d in uploads]
    )
    assert decoder.decoded - before == len(uploads)  # nvJPEG decoded every one
    cpu_arrays = [load_image(d, "x", MAX_PIXELS, gpu_classifier.transform) for d in uploads]
    on_cpu = gpu_classifier.predict_blocking([Item(a, 5) for a in cpu_arrays])
    agree = sum(g.indices[0] == c.indices[0] for g, c in zip(on_gpu, on_cpu, strict=True))
    assert agree == len(uploads)


def test_an_image_nvjpeg_cannot_decode_fails_alone_in_its_batch(
    gpu_classifier: Classifier,
) -> None:
    decoder = gpu_classifier.device_decoder
    assert decoder is not None
    cat = web_jpeg("chelsea.jpg")
    batch = [
        Item(device_jpeg(cat, gpu_classifier.transform), 3),
        Item(device_jpeg(cat[: len(cat) // 2], gpu_classifier.transform, "cut.jpg"), 3),
        Item(device_jpeg(web_jpeg("coffee.jpg"), gpu_classifier.transform), 3),
    ]
    fell_back = decoder.fell_back
    answers = gpu_classifier.submit(batch).result()
    assert isinstance(answers[1], BadImage)
    assert "cut.jpg" in str(answers[1])
    assert isinstance(answers[0], TopK)
    assert isinstance(answers[2], TopK)
    assert decoder.fell_back == fell_back + 1


def test_a_cuda_model_stages_batches_in_pinned_buffers_it_reuses(
    gpu_classifier: Classifier,
) -> None:
    buffers = gpu_classifier._staging.buffers
    assert all(buffer.is_pinned() for buffer in buffers)
    storages = [buffer.data_ptr() for buffer in buffers]
    cat = load_image(web_jpeg("chelsea.jpg"), "cat", MAX_PIXELS, gpu_classifier.transform)
    for size in (1, 16, 5, 16, 3, 8, 16, 2, 9, 16):
        staged = gpu_classifier.stage([Item(cat, 1)] * size)
        assert staged.ready is not None  # issued on the side stream
        answers = gpu_classifier.compute(staged)
        assert len({tuple(a.indices) for a in answers if isinstance(a, TopK)}) == 1
    assert [buffer.data_ptr() for buffer in gpu_classifier._staging.buffers] == storages
    assert gpu_classifier.stage_executor is not None


def test_serving_on_cuda_decodes_jpegs_on_the_gpu_over_http() -> None:
    with TestClient(create_app(make_settings(device="cuda"))) as client:
        info = client.get(f"/v1/models/{DEFAULT_MODEL}").json()
        assert info["device"].startswith("cuda")
        assert info["preprocessing"]["device_decode"] is True
        files = [("file", (f"cat{i}.jpg", web_jpeg("chelsea.jpg"), "image/jpeg")) for i in range(4)]
        response = client.post("/v1/predict", files=files)
        assert response.status_code == 200, response.text
        for prediction in response.json()["predictions"]:
            assert prediction["classes"][0]["label"] in CAT_CLASSES
        model = client.app.state.serving.default_model  # type: ignore[attr-defined]
        decoder = classifier_of(model).device_decoder
        assert decoder is not None
        assert decoder.decoded >= 4


def compiled_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def test_compile_on_cuda_captures_cuda_graphs_at_warm_up_and_never_recompiles() -> None:
    settings = make_settings(device="cuda", compile=True, max_batch_size=8)
    with TestClient(create_app(settings)) as client:
        info = client.get(f"/v1/models/{DEFAULT_MODEL}").json()
        assert info["compiled_batch_sizes"] == [1, 2, 4, 8]
        graphs = compiled_graphs()
        eager_free = torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0)
        assert eager_free == 0  # every size was captured as a CUDA graph, none skipped
        cat = web_jpeg("chelsea.jpg")
        for count in (1, 2, 3, 5, 8, 7, 1):
            files = [("file", (f"c{i}.jpg", cat, "image/jpeg")) for i in range(count)]
            response = client.post("/v1/predict", files=files)
            assert response.status_code == 200, response.text
            labels = [p["classes"][0]["label"] for p in response.json()["predictions"]]
            assert all(label in CAT_CLASSES for label in labels)
        assert compiled_graphs() == graphs  # nothing compiled while serving
        assert torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0) == 0
