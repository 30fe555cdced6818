"""``compile``: a torch.compile-d model answers as the eager one, runs every batch size as
compiled sizes (padded or split), and never compiles while serving."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch._dynamo.utils
from fastapi.testclient import TestClient
from PIL import Image
from support import MODELS, make_settings

from app.main import create_app
from app.model.optimize import CompileError
from app.model.repository import discover
from app.model.runtime import Classifier
from app.values import Item


def digits_only(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    shutil.copytree(MODELS / "digits", repo / "digits")
    return repo


def compiled_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def serve_digits(repo: Path, images: list[Path], compile: bool) -> tuple[dict, list[Any]]:
    """Model metadata, and the answers to requests of 1, 2, 3 and 4 images, in that order."""
    settings = make_settings(
        model_repository=repo, default_model="digits", compile=compile, max_batch_size=4
    )
    with TestClient(create_app(settings)) as client:
        info = client.get("/v1/models/digits").json()
        batcher = client.app.state.serving.default_model.batcher  # type: ignore[attr-defined]
        graphs = compiled_graphs()
        answers = []
        for count in (1, 2, 3, 4):
            files = [("file", (p.name, p.read_bytes(), "image/png")) for p in images[:count]]
            response = client.post("/v1/predict?top_k=3", files=files)
            assert response.status_code == 200, response.text
            answers += response.json()["predictions"]
            assert batcher.stats.largest_batch == count  # one batch per request
        # Every batch size, 3 included (padded to 4 or split), ran on graphs compiled at warm-up.
        assert compiled_graphs() == graphs
    return info, answers


def test_compiled_model_answers_as_the_eager_one_and_never_compiles_while_serving(
    tmp_path: Path, digits_test_split: Path
) -> None:
    repo = digits_only(tmp_path)
    images = sorted(digits_test_split.glob("*/*.png"))[::37][:4]
    before = compiled_graphs()
    compiled_info, compiled = serve_digits(repo, images, compile=True)
    assert compiled_info["compiled_batch_sizes"] == [1, 2, 4]
    assert compiled_graphs() == before + 3  # one graph per bucket, all at warm-up
    eager_info, eager = serve_digits(repo, images, compile=False)
    assert eager_info["compiled_batch_sizes"] == []
    assert len(compiled) == len(eager) == 10
    for got, expected in zip(compiled, eager, strict=True):
        assert [c["index"] for c in got["classes"]] == [c["index"] for c in expected["classes"]]
        for a, b in zip(got["classes"], expected["classes"], strict=True):
            assert abs(a["score"] - b["score"]) < 1e-5


def test_compile_in_model_toml_is_overridden_by_the_setting(tmp_path: Path) -> None:
    repo = digits_only(tmp_path)
    toml = repo / "digits" / "model.toml"
    # compile is a torch option: the toml that asks for it asks for the torch runtime too.
    text = toml.read_text().replace('runtime = "onnxruntime"', 'runtime = "torch"')
    toml.write_text(text.replace("[model]", "[model]\ncompile = true"))
    settings = make_settings(model_repository=repo, default_model="digits", compile=False)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/models/digits").json()["compiled_batch_sizes"] == []
    settings = make_settings(model_repository=repo, default_model="digits", max_batch_size=2)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/models/digits").json()["compiled_batch_sizes"] == [1, 2]


def test_padded_and_split_plans_give_the_eager_scores(digits_test_split: Path) -> None:
    spec = discover(MODELS)["digits"]
    images = [
        np.asarray(Image.open(p))[:, :, None] for p in sorted(digits_test_split.glob("*/*.png"))
    ][:: 360 // 4][:4]
    eager = Classifier(spec, torch.device("cpu"), None, compile=False)
    compiled = Classifier(spec, torch.device("cpu"), None, compile=True)
    try:
        compiled.warm_up(4)
        graphs = compiled_graphs()
        expected = [eager.predict_blocking([Item(i, 3) for i in images[:n]]) for n in (1, 2, 3, 4)]
        # Costs that make every batch split into ones, then every batch padded up to 4.
        for costs, three in (
            ({1: 1.0, 2: 9.0, 4: 9.0}, (1, 1, 1)),
            ({1: 9.0, 2: 9.0, 4: 1.0}, (4,)),
        ):
            assert compiled.compiled is not None
            compiled.compiled.plan(costs, 4)  # as warm_up would have measured them
            assert compiled.compiled.plans[3] == three
            for n, want in zip((1, 2, 3, 4), expected, strict=True):
                got = compiled.predict_blocking([Item(i, 3) for i in images[:n]])
                assert [g[1] for g in got] == [w[1] for w in want]
                assert np.allclose([g[0] for g in got], [w[0] for w in want], atol=1e-5)
        assert compiled_graphs() == graphs
    finally:
        eager.close()
        compiled.close()


def test_eager_torch_on_the_cpu_plans_every_batch_size_from_passes_timed_at_warm_up(
    digits_test_split: Path,
) -> None:
    spec = discover(MODELS)["digits"]
    images = [
        np.asarray(Image.open(p))[:, :, None] for p in sorted(digits_test_split.glob("*/*.png"))
    ]
    items = [Item(image, 3) for image in images[:: 360 // 8][:8]]
    torch_eager = Classifier(spec, torch.device("cpu"), None, runtime="torch")
    exported = Classifier(spec, torch.device("cpu"), None, runtime="onnxruntime")
    try:
        assert exported.split is None  # measured cheapest per image in one pass
        assert torch_eager.split is not None
        assert torch_eager.split.plans == {}
        torch_eager.warm_up(8)
        plans = torch_eager.split.plans
        assert sorted(plans) == list(range(1, 9))
        for n, plan in plans.items():
            assert sum(plan) >= n
            assert set(plan) <= {1, 2, 4, 8}
        # However the batch of 8 was split, each image gets what it gets alone.
        together = torch_eager.predict_blocking(items)
        for item, got in zip(items, together, strict=True):
            (alone,) = torch_eager.predict_blocking([item])
            assert got.indices == alone.indices
            assert np.allclose(got.scores, alone.scores, atol=1e-5)
    finally:
        torch_eager.close()
        exported.close()


def test_compiling_makes_room_for_its_sizes_and_refuses_a_fall_back_to_eager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch._dynamo import config as dynamo_config

    # dynamo keeps at most recompile_limit graphs per code object, and every model of one class
    # shares its forward's: past the limit dynamo runs eagerly with only a warning (measured: a
    # second EfficientNet-Lite0 compiled in one process lost its sizes 8 and 16 that way).
    # Each compiled model raises the limit by its own number of sizes.
    monkeypatch.setattr(dynamo_config, "recompile_limit", 1)
    spec = discover(MODELS)["digits"]
    classifier = Classifier(spec, torch.device("cpu"), None, compile=True)

    def forward(size: int) -> float:
        blank = np.zeros((8, 8, 1), np.uint8)
        classifier.predict_blocking([Item(blank, 1)] * size)
        return 0.0

    try:
        classifier.warm_up(4)
        assert classifier.buckets == (1, 2, 4)
        assert dynamo_config.recompile_limit == 1 + 3
        # A size whose pass makes no new graph (here: one compiled already) is refused rather
        # than served eagerly in silence.
        assert classifier.compiled is not None
        with pytest.raises(CompileError, match="made no graph for batches of 2"):
            classifier.compiled.compile((2,), forward)
    finally:
        classifier.close()
