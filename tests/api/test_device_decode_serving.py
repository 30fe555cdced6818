"""The GPU path's batches, run on the CPU: JPEGs planned at the request and decoded with their
batch by the model (``DeviceDecoder``, libjpeg here, nvJPEG on CUDA), each batch staged in the
stage thread while the previous one computes, the answers back in one copy. Everything but
the CUDA calls runs here with the real model; tests/api/test_cuda.py runs it on a GPU."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from support import (
    CAT_CLASSES,
    DEFAULT_MODEL,
    MODELS,
    PHOTOS,
    device_jpeg,
    make_settings,
    photo,
    web_jpeg,
)

from app.batching import Batcher
from app.main import create_app
from app.model.repository import ModelConfigError, discover
from app.model.runtime import Classifier
from app.preprocessing import BadImage, load_image
from app.state import ServedModel
from app.values import Item, TopK

MAX_PIXELS = 40_000_000


@pytest.fixture(scope="module")
def classifier() -> Iterator[Classifier]:
    spec = discover(MODELS, DEFAULT_MODEL)[DEFAULT_MODEL]
    model = Classifier(spec, torch.device("cpu"), 2, runtime="torch", device_decode=True)
    try:
        yield model
    finally:
        model.close()


def test_jpegs_decoded_with_their_batch_get_the_cpu_paths_classes(classifier: Classifier) -> None:
    transform = classifier.transform
    uploads = [web_jpeg(name) for name in PHOTOS]
    on_device = classifier.predict_blocking([Item(device_jpeg(d, transform), 5) for d in uploads])
    on_cpu = classifier.predict_blocking(
        [Item(load_image(d, "upload", MAX_PIXELS, transform), 5) for d in uploads]
    )
    for device, cpu in zip(on_device, on_cpu, strict=True):
        assert device.indices[0] == cpu.indices[0]
        assert abs(device.scores[0] - cpu.scores[0]) < 0.02
    assert classifier.describe().preprocessing.device_decode


def test_each_kind_of_item_in_one_batch_gets_its_own_answer(classifier: Classifier) -> None:
    transform = classifier.transform
    cat, coffee = web_jpeg("chelsea.jpg"), web_jpeg("coffee.jpg")
    array = load_image(coffee, "coffee", MAX_PIXELS, transform)
    mean = np.array(classifier.spec.preprocessing.mean, dtype=np.float32)[:, None, None]
    std = np.array(classifier.spec.preprocessing.std, dtype=np.float32)[:, None, None]
    tensor = ((array.transpose(2, 0, 1) / np.float32(255) - mean) / std).astype(np.float32)
    cut = device_jpeg(cat[: len(cat) // 2], transform, "cut.jpg")
    batch = [
        Item(array, 3),
        Item(device_jpeg(cat, transform), 5),
        Item(tensor, 2),
        Item(cut, 5),
    ]
    answers = classifier.submit(batch).result()
    assert isinstance(answers[3], BadImage)
    assert "cut.jpg" in str(answers[3])
    for item, answer in zip(batch[:3], answers[:3], strict=True):
        (alone,) = classifier.predict_blocking([item])
        assert isinstance(answer, TopK)
        assert answer.indices == alone.indices
        assert len(answer.indices) == item.top_k
        assert np.allclose(answer.scores, alone.scores, atol=1e-5)


def test_concurrent_requests_through_staged_batches_are_each_answered_rightly(
    classifier: Classifier,
) -> None:
    transform = classifier.transform
    uploads = [web_jpeg(name) for name in PHOTOS]
    expected = [a.indices for a in classifier.predict_blocking(
        [Item(device_jpeg(d, transform), 3) for d in uploads]
    )]  # fmt: skip
    storages = [buffer.data_ptr() for buffer in classifier._staging.buffers]

    async def main() -> tuple[list[list[TopK]], int]:
        with ThreadPoolExecutor(1, thread_name_prefix="stage") as stager:
            batcher: Batcher[Item, TopK] = Batcher(
                classifier.compute,
                classifier.executor,
                stage=classifier.stage,
                stage_executor=stager,
                max_batch_size=4,
                max_delay_s=0.005,
                max_queue_size=64,
            )
            batcher.start()
            answers = await asyncio.gather(
                *[
                    batcher.submit([Item(device_jpeg(uploads[i % 8], transform), 3)], 60)
                    for i in range(24)
                ]
            )
            await batcher.stop()
            return answers, batcher.stats.batches

    answers, batches = asyncio.run(main())
    assert [a.indices for (a,) in answers] == [expected[i % 8] for i in range(24)]
    assert batches >= 6  # batches of at most 4
    # Every batch was staged in the same three host buffers.
    assert [buffer.data_ptr() for buffer in classifier._staging.buffers] == storages


def test_every_batch_is_staged_in_one_of_three_buffers_made_once(classifier: Classifier) -> None:
    cat = load_image(web_jpeg("chelsea.jpg"), "cat", MAX_PIXELS, classifier.transform)
    buffers = {buffer.data_ptr() for buffer in classifier._staging.buffers}
    staged_in = set()
    for size in (1, 16, 5, 16, 3, 8, 2, 9):
        staged = classifier.stage([Item(cat, 1)] * size)
        # On the CPU the staged batch is the staging buffer itself: no copy, no allocation.
        staged_in.add(staged.batch.data_ptr())
        assert len({tuple(a.indices) for a in classifier.compute(staged)}) == 1  # type: ignore[union-attr]
    assert staged_in == buffers


def test_over_http_a_jpeg_the_model_decodes_answers_and_a_broken_one_fails_alone(
    classifier: Classifier,
) -> None:
    """The HTTP side plans which uploads the model decodes (its facts say it decodes JPEGs);
    an image only decoding finds broken is answered 400, naming it, and serving goes on."""
    settings = make_settings()
    with TestClient(create_app(settings)) as client:
        serving = client.app.state.serving  # type: ignore[attr-defined]
        stager = ThreadPoolExecutor(1, thread_name_prefix="stage")
        batcher: Batcher[Item, TopK] = Batcher(
            classifier.compute,
            classifier.executor,
            stage=classifier.stage,
            stage_executor=stager,
            max_batch_size=settings.max_batch_size,
            max_delay_s=0.005,
            max_queue_size=settings.max_queue_size,
        )
        client.portal.call(batcher.start)  # type: ignore[union-attr]
        served = serving.models[DEFAULT_MODEL]
        serving.models[DEFAULT_MODEL] = ServedModel(
            classifier, batcher, classifier.transform, classifier.describe()
        )
        try:
            info = client.get(f"/v1/models/{DEFAULT_MODEL}").json()
            assert info["preprocessing"]["device_decode"] is True
            cat = web_jpeg("chelsea.jpg")
            ok = client.post("/v1/predict", files={"file": ("cat.jpg", cat, "image/jpeg")})
            assert ok.status_code == 200, ok.text
            assert ok.json()["predictions"][0]["classes"][0]["label"] in CAT_CLASSES
            files = [
                ("file", ("cat.jpg", cat, "image/jpeg")),
                ("file", ("cut.jpg", cat[: len(cat) // 2], "image/jpeg")),
            ]
            broken = client.post("/v1/predict", files=files)
            assert broken.status_code == 400, broken.text
            assert broken.json()["error"]["code"] == "invalid_image"
            assert "cut.jpg" in broken.json()["error"]["message"]
            png = client.post("/v1/predict", files={"file": ("cat.png", photo("chelsea.png"))})
            assert png.status_code == 200  # decoded on the CPU, as before
            assert batcher.stats.items == 4
        finally:
            client.portal.call(batcher.stop)  # type: ignore[union-attr]
            stager.shutdown()
            serving.models[DEFAULT_MODEL] = served  # stopped with the server, as it was made


def test_agreement_reports_how_often_device_decoding_keeps_the_cpu_paths_top_class() -> None:
    from app import photos
    from app.tools import agreement

    images = []
    for name in photos.NAMES:
        with Image.open(photos.path(name)) as image:
            images.append(image.convert("RGB"))
    found = agreement.measure(MODELS, DEFAULT_MODEL, "gpu_decode", "cpu", images=images)
    assert (found.candidate, found.images) == ("gpu_decode", len(photos.NAMES))
    assert found.top1_agreement == 1.0
    # Not the CPU path twice: the tensor resize moves the logits a little, and only a little.
    assert 0.0 < found.max_logit_difference_relative < 0.05
    with pytest.raises(ModelConfigError, match="CPU only"):
        agreement.measure(MODELS, "digits", "gpu_decode", "cpu", images=images[:1])
