"""What the server says about its models: the version model.toml declares (on /v1 and /v2),
and OpenAPI examples that are valid instances of their own schemas."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel
from support import MODELS, make_settings, photo

from app.api import schemas
from app.main import create_app
from app.model.repository import ModelConfigError


def repository_with_digits_version(tmp_path: Path, version: str | None) -> Path:
    repo = tmp_path / "models"
    shutil.copytree(MODELS / "digits", repo / "digits")
    if version is not None:
        toml = repo / "digits" / "model.toml"
        toml.write_text(toml.read_text().replace("[model]\n", f"[model]\nversion = {version}\n"))
    return repo


def test_the_version_in_model_toml_is_what_v1_and_v2_report(tmp_path: Path) -> None:
    repo = repository_with_digits_version(tmp_path, "3")  # a TOML integer
    settings = make_settings(model_repository=repo, default_model="digits")
    body = {
        "inputs": [{"name": "x", "shape": [1, 8, 8, 1], "datatype": "UINT8", "data": [0] * 64}],
    }
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/models/digits").json()["version"] == "3"
        assert client.get("/v2/models/digits").json()["versions"] == ["3"]
        assert client.get("/v2/models/digits/versions/3/ready").status_code == 200
        assert client.get("/v2/models/digits/versions/1").status_code == 404
        answer = client.post("/v2/models/digits/versions/3/infer", json=body)
        assert answer.status_code == 200
        assert answer.json()["model_version"] == "3"
        unversioned = client.post("/v2/models/digits/infer", json=body).json()
        assert unversioned["model_version"] == "3"
        assert client.post("/v2/models/digits/versions/1/infer", json=body).status_code == 404


def test_a_model_without_a_version_is_version_1(tmp_path: Path) -> None:
    repo = repository_with_digits_version(tmp_path, None)
    settings = make_settings(model_repository=repo, default_model="digits")
    with TestClient(create_app(settings)) as client:
        assert client.get("/v2/models/digits").json()["versions"] == ["1"]
        assert client.get("/v1/models/digits").json()["version"] == "1"
        digit = client.post("/v1/predict", files={"file": photo("chelsea.jpg")})
        assert digit.status_code == 200


@pytest.mark.parametrize("bad", ['"two words"', '""', "true"])
def test_a_malformed_version_stops_start_up(tmp_path: Path, bad: str) -> None:
    repo = repository_with_digits_version(tmp_path, bad)
    settings = make_settings(model_repository=repo, default_model="digits")
    with (
        pytest.raises(ModelConfigError, match=r"model 'digits': bad model.toml: model.version"),
        TestClient(create_app(settings)),
    ):
        pass


def _models_with_examples() -> list[type[BaseModel]]:
    found = []
    for value in vars(schemas).values():
        if isinstance(value, type) and issubclass(value, BaseModel) and value is not BaseModel:
            extra = value.model_config.get("json_schema_extra")
            if isinstance(extra, dict) and extra.get("examples"):
                found.append(value)
    return found


@pytest.mark.parametrize("model", _models_with_examples(), ids=lambda m: m.__name__)
def test_every_schema_example_is_a_valid_instance(model: type[BaseModel]) -> None:
    extra: Any = model.model_config.get("json_schema_extra")
    for example in extra["examples"]:
        model.model_validate(example)  # ModelInfo's lacked its required preprocessing once


def test_the_model_info_example_matches_what_the_server_reports() -> None:
    extra: Any = schemas.ModelInfo.model_config.get("json_schema_extra")
    [example] = extra["examples"]
    with TestClient(create_app(make_settings())) as client:
        served = client.get("/v1/models/efficientnet_lite0").json()
    assert set(example) == set(served)
    for key in ("name", "version", "source", "architecture", "input_size", "preprocessing"):
        assert example[key] == served[key], key
