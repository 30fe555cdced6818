"""Precision settings: bf16 autocast serves the same classes; fp16 is refused off CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from support import CAT_CLASSES, MODELS, classifier_of, make_settings, photo

from app.main import create_app
from app.model.repository import ModelConfigError
from app.tools.cli import main

bf16 = pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no bf16 support"
)


@bf16
def test_bf16_serves_the_same_top_class_and_reports_its_dtype() -> None:
    with TestClient(create_app(make_settings(precision="bf16"))) as client:
        info = client.get("/v1/models/efficientnet_lite0").json()
        assert info["dtype"] == "bfloat16"
        response = client.post("/v1/predict", files={"file": photo("chelsea.jpg")})
        assert response.status_code == 200
        assert response.json()["predictions"][0]["classes"][0]["label"] in CAT_CLASSES
        model = client.app.state.serving.default_model  # type: ignore[attr-defined]
        assert not any(m.training for m in classifier_of(model).module.modules())


def test_fp16_on_the_cpu_stops_start_up_with_a_clear_message() -> None:
    with (
        pytest.raises(ModelConfigError, match="fp16 needs a CUDA device"),
        TestClient(create_app(make_settings(precision="fp16"))),
    ):
        pass


@bf16
def test_agreement_tool_reports_top1_agreement(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["agreement", "bf16", "--model", "digits", "--model-repository", str(MODELS), "--json"]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 448
    assert result["candidate"] == "bf16"
    assert 0.9 <= result["top1_agreement"] <= 1.0
    low, high = result["top1_agreement_95ci"]
    assert low < result["top1_agreement"] <= high <= 1.0
    assert 0.0 <= result["max_top1_score_change"] < 0.5
    assert 0.0 <= result["largest_flipped_margin"] < 1.0


@pytest.mark.cuda
def test_fp16_on_cuda_serves_the_same_top_class() -> None:
    with TestClient(create_app(make_settings(precision="fp16", device="cuda"))) as client:
        assert client.get("/v1/models/efficientnet_lite0").json()["dtype"] == "float16"
        response = client.post("/v1/predict", files={"file": photo("chelsea.jpg")})
        assert response.json()["predictions"][0]["classes"][0]["label"] in CAT_CLASSES
