"""A model repository that is one model folder (KServe's storage initializer copies the folder a
storageUri names into /mnt/models, so model.toml lands at /mnt/models/model.toml): served as one
model under the default model's name. Model files with no model.toml are refused at start."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from support import MODELS, make_settings

from app.config import Settings
from app.model.repository import ModelConfigError, discover
from app.serving import open_serving

DIGITS = MODELS / "digits"
# The name an InferenceService gives the model ({{.Name}} in the runtime): not the folder's.
NAME = "digits-classifier"


@pytest.fixture
def mnt_models(tmp_path: Path) -> Path:
    """The digits model folder's files directly in a folder, as the storage initializer
    leaves them in /mnt/models."""
    folder = tmp_path / "models"
    shutil.copytree(DIGITS, folder)
    assert (folder / "model.toml").is_file()
    return folder


def test_a_folder_holding_model_toml_is_one_model_named_as_the_caller_says(
    mnt_models: Path,
) -> None:
    specs = discover(mnt_models, NAME)
    assert list(specs) == [NAME]
    spec = specs[NAME]
    assert spec.name == NAME
    assert spec.directory == mnt_models
    assert spec.model_file == mnt_models / "model.pt2"
    assert spec.config.model.source == "export"
    labels = (DIGITS / "labels.txt").read_text().split()
    assert list(spec.labels) == labels
    assert len(labels) == 10


def test_without_a_name_the_single_model_is_named_by_its_folder(mnt_models: Path) -> None:
    assert list(discover(mnt_models)) == ["models"]


def test_a_folder_of_model_folders_is_still_one_model_per_folder(tmp_path: Path) -> None:
    shutil.copytree(DIGITS, tmp_path / "digits")
    # The name only names a single-model repository; here the folders name their models.
    specs = discover(tmp_path, NAME)
    assert list(specs) == ["digits"]
    assert specs["digits"].name == "digits"


def test_a_bare_pt2_without_model_toml_fails_saying_to_add_one(tmp_path: Path) -> None:
    shutil.copy(DIGITS / "model.pt2", tmp_path / "model.pt2")
    with pytest.raises(ModelConfigError) as caught:
        discover(tmp_path, NAME)
    assert caught.value.model == NAME
    message = str(caught.value)
    assert "model.pt2" in message
    assert "no model.toml" in message
    assert "add one" in message
    assert "labels and preprocessing" in message


def test_a_torchserve_model_store_fails_naming_its_archive(tmp_path: Path) -> None:
    # KServe's TorchServe layout: config/config.properties and model-store/<model>.mar.
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.properties").write_text("inference_address=0.0.0.0:8085\n")
    (tmp_path / "model-store").mkdir()
    (tmp_path / "model-store" / "mnist.mar").write_bytes(b"PK\x03\x04")
    with pytest.raises(ModelConfigError, match=r"model-store/mnist\.mar but no model\.toml"):
        discover(tmp_path, NAME)


def test_a_folder_with_neither_models_nor_model_files_says_no_model_toml(tmp_path: Path) -> None:
    (tmp_path / "README.txt").write_text("nothing to serve\n")
    with pytest.raises(ModelConfigError, match=r"no model\.toml found under"):
        discover(tmp_path, NAME)


def test_a_broken_single_model_is_reported_under_its_served_name(mnt_models: Path) -> None:
    (mnt_models / "labels.txt").unlink()
    with pytest.raises(ModelConfigError) as caught:
        discover(mnt_models, NAME)
    assert caught.value.model == NAME
    assert str(caught.value).startswith(f"model {NAME!r}: labels file not found")


def test_a_single_model_name_must_be_a_valid_model_name(mnt_models: Path) -> None:
    with pytest.raises(ModelConfigError, match="not a valid model name"):
        discover(mnt_models, "digits classifier")


def test_serving_a_single_model_repository_answers_as_the_default_model(
    mnt_models: Path,
) -> None:
    settings = make_settings(model_repository=mnt_models, default_model=NAME)

    async def served() -> tuple[list[str], str, int]:
        async with open_serving(settings) as serving:
            model = serving.default_model
            return list(serving.models), model.name, len(model.labels)

    assert asyncio.run(served()) == ([NAME], NAME, 10)


def test_evalserve_serve_starts_on_a_single_model_repository(
    mnt_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.server
    from app.tools import cli

    started: list[Settings] = []
    monkeypatch.setattr(app.server, "run", started.append)
    settings = make_settings(model_repository=mnt_models, default_model=NAME)
    cli.serve(settings)
    assert started == [settings]
