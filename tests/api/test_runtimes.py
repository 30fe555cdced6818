"""Exported runtimes (ONNX Runtime, OpenVINO): each serves only after proving, at start-up,
that it gives the torch module's logits; a model whose export differs is refused by name, and
what an exported runtime cannot do is refused before anything loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from support import CAT_CLASSES, MODELS, make_settings, photo

from app.main import create_app
from app.model import exported
from app.model.repository import ModelConfigError, discover
from app.model.runtime import Classifier, choose_runtime
from app.tools.cli import main

EXPORTED = ["onnxruntime", "openvino"]


def scores(client: TestClient, model: str, name: str) -> dict[int, float]:
    response = client.post(f"/v1/models/{model}/predict?top_k=10", files={"file": photo(name)})
    assert response.status_code == 200, response.text
    return {c["index"]: c["score"] for c in response.json()["predictions"][0]["classes"]}


@pytest.mark.parametrize("runtime", EXPORTED)
def test_an_exported_runtime_answers_as_torch_does(runtime: str) -> None:
    with TestClient(create_app(make_settings(runtime="torch"))) as client:
        expected = {name: scores(client, "efficientnet_lite0", name) for name in ("chelsea.jpg",)}
        digits = scores(client, "digits", "camera.jpg")
    with TestClient(create_app(make_settings(runtime=runtime))) as client:
        info = client.get("/v1/models/efficientnet_lite0").json()
        got = scores(client, "efficientnet_lite0", "chelsea.jpg")
        got_digits = scores(client, "digits", "camera.jpg")
        v2 = client.get("/v2/models/efficientnet_lite0").json()
    assert info["runtime"] == runtime
    assert 0 <= info["max_logit_difference"] <= exported.TOLERANCE
    assert v2["platform"] == "evalserve_timm"
    for want, have in ((expected["chelsea.jpg"], got), (digits, got_digits)):
        assert list(have) == list(want)  # the same classes, in the same order
        assert all(abs(have[i] - want[i]) < 1e-5 for i in want)
    assert next(iter(got)) in {285, 281, 282}  # Egyptian cat, tabby, tiger cat
    assert CAT_CLASSES


def test_a_model_whose_export_differs_is_refused_naming_the_difference(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The export is made to differ: the first layer's weights change between the module torch
    serves and the graph handed to the runtime, as a broken exporter would do."""
    real = exported.to_onnx

    def drifting_export(module: torch.nn.Module, input_size: tuple[int, int, int]) -> bytes:
        weight = next(p for p in module.parameters() if p.ndim == 4)
        original = weight.detach().clone()
        with torch.no_grad():
            weight.mul_(1.01)  # 1% off: far beyond rounding, small enough to look fine
        try:
            return real(module, input_size)
        finally:
            with torch.no_grad():
                weight.copy_(original)

    monkeypatch.setattr(exported, "to_onnx", drifting_export)
    monkeypatch.setattr(exported, "default_cache", lambda: tmp_path)  # no graph exported before
    spec = discover(MODELS)["digits"]
    with pytest.raises(ModelConfigError) as refused:
        Classifier(spec, torch.device("cpu"), None, runtime="onnxruntime")
    message = str(refused.value)
    assert message.startswith("model 'digits': the onnxruntime export does not compute")
    assert "of the largest logit" in message
    assert 'runtime = "torch"' in message
    assert list(tmp_path.iterdir()) == []  # nothing unproven is kept for the next start


def test_the_proof_needs_close_logits_and_the_same_top_1() -> None:
    expected = torch.tensor([[4.0, 1.0, 0.0], [0.0, 2.0, 1.99999]])
    assert exported.prove_equal(expected, expected + 1e-6)[1] is None
    relative, problem = exported.prove_equal(expected, expected + torch.tensor([0.0, 0.0, 0.01]))
    assert problem is not None
    assert relative == pytest.approx(0.01 / 4)
    # Within tolerance, but the near tie of the second row flips.
    flipped = expected.clone()
    flipped[1, 2] = 2.00001
    relative, problem = exported.prove_equal(expected, flipped)
    assert relative < exported.TOLERANCE
    assert problem == "the top-1 class differs for 1 of 2 probe images"
    assert exported.prove_equal(expected, expected[:1])[1] == "logits of shape (1, 3), not (2, 3)"


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"precision": "bf16"}, "runtime onnxruntime serves fp32 only, not bf16"),
        ({"compile": True}, "compile is a torch option"),
    ],
)
def test_what_an_exported_runtime_cannot_do_is_refused_at_once(
    options: dict[str, object], problem: str
) -> None:
    spec = discover(MODELS)["digits"]
    with pytest.raises(ModelConfigError, match=problem):
        Classifier(spec, torch.device("cpu"), None, runtime="onnxruntime", **options)  # type: ignore[arg-type]


def test_the_runtime_setting_overrides_model_toml() -> None:
    spec = discover(MODELS)["digits"]
    # model.toml chooses another runtime, so only the setting can make it openvino.
    assert spec.config.model.runtime != "openvino"
    with TestClient(create_app(make_settings(runtime="openvino"))) as client:
        runtimes = {m["name"]: m["runtime"] for m in client.get("/v1/models").json()["models"]}
    assert runtimes == {"digits": "openvino", "efficientnet_lite0": "openvino"}


@pytest.mark.parametrize("runtime", EXPORTED)
def test_agreement_compares_a_runtime_with_torch_on_a_folder(
    runtime: str, digits_test_split: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["agreement", runtime, "--model", "digits", "--images", str(digits_test_split)]
    assert main([*arguments, "--model-repository", str(MODELS), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["candidate"] == runtime
    assert result["images"] == 360
    assert result["top1_agreement"] == 1.0
    assert result["max_logit_difference"] > 0  # not the same code: rounding differs a little
    assert result["max_logit_difference_relative"] <= exported.TOLERANCE


def test_agreement_on_a_folder_without_images_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["agreement", "onnxruntime", "--model", "digits", "--images", str(tmp_path)]
    assert main([*arguments, "--model-repository", str(MODELS)]) == 2
    assert f"no images under {tmp_path}" in capsys.readouterr().err


def test_agreement_on_a_folder_with_a_broken_image_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "good.jpg").write_bytes(photo("chelsea.jpg"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    arguments = ["agreement", "onnxruntime", "--model", "digits", "--images", str(tmp_path)]
    assert main([*arguments, "--model-repository", str(MODELS)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"evalserve agreement: {broken}: ")
    assert "Traceback" not in error


@pytest.mark.parametrize(
    ("device", "precision", "compile", "chosen"),
    [
        ("cpu", None, None, "onnxruntime"),  # model.toml's choice
        ("cuda", None, None, "torch"),  # an exported runtime is a CPU choice
        ("cpu", "bf16", None, "torch"),  # only torch does bf16
        ("cpu", "fp32", None, "onnxruntime"),
        ("cpu", None, True, "torch"),  # and compiles
    ],
)
def test_settings_only_torch_honours_take_a_model_off_its_exported_runtime(
    device: str, precision: str | None, compile: bool | None, chosen: str
) -> None:
    spec = discover(MODELS)["digits"]
    assert spec.config.model.runtime == "onnxruntime"
    where = torch.device(device)
    assert choose_runtime(spec, where, None, precision, compile) == chosen  # type: ignore[arg-type]
    # A runtime setting is taken as given (and refused later if it cannot do the rest).
    assert choose_runtime(spec, where, "openvino", precision, compile) == "openvino"  # type: ignore[arg-type]


def test_a_model_toml_asking_an_exported_runtime_for_bf16_is_refused(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(MODELS / "digits", repo / "digits")
    toml = repo / "digits" / "model.toml"
    toml.write_text(toml.read_text().replace("[model]", '[model]\nprecision = "bf16"'))
    with pytest.raises(ModelConfigError, match="runtime 'onnxruntime' serves fp32 without"):
        discover(repo)


def test_a_proven_graph_is_reused_and_a_stale_one_is_exported_afresh(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(exported, "default_cache", lambda: tmp_path)
    exports: list[int] = []
    real = exported.to_onnx

    def counted(module: torch.nn.Module, input_size: tuple[int, int, int]) -> bytes:
        exports.append(1)
        return real(module, input_size)

    monkeypatch.setattr(exported, "to_onnx", counted)
    spec = discover(MODELS)["digits"]
    Classifier(spec, torch.device("cpu"), None, runtime="onnxruntime").close()
    [kept] = list(tmp_path.iterdir())
    Classifier(spec, torch.device("cpu"), None, runtime="openvino").close()
    assert len(exports) == 1  # the second start, even on another runtime, reused the graph
    other = discover(MODELS)["efficientnet_lite0"]
    good = Classifier(other, torch.device("cpu"), None, runtime="onnxruntime")
    good.close()
    # The digits graph under the other model's name: stale, so it fails the proof and is
    # replaced by a fresh export.
    [other_kept] = [path for path in tmp_path.iterdir() if path != kept]
    other_kept.write_bytes(kept.read_bytes())
    Classifier(other, torch.device("cpu"), None, runtime="onnxruntime").close()
    assert len(exports) == 3
    assert other_kept.read_bytes() != kept.read_bytes()
