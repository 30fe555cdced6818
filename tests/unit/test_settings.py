"""Settings: environment variables, constraints, and the README's table staying true."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError
from support import ROOT

from app.config import Settings, UnknownSetting, check_environment


def test_defaults_are_the_documented_ones() -> None:
    settings = Settings()
    assert settings.max_batch_size == 16
    assert settings.max_batch_delay_ms == 5.0
    assert settings.max_queue_size == 256
    assert settings.default_top_k == 5
    assert settings.max_upload_bytes == 20 * 1024 * 1024
    assert settings.max_image_pixels == 40_000_000
    assert settings.device == "auto"
    assert settings.default_model == "efficientnet_lite0"


def test_environment_variables_with_the_prefix_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVALSERVE_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("EVALSERVE_DEVICE", "cuda:1")
    settings = Settings()
    assert settings.max_batch_size == 4
    assert settings.device == "cuda:1"


@pytest.mark.parametrize(
    "bad",
    [
        {"device": "gpu"},
        {"device": "cuda:x"},
        {"max_batch_size": 0},
        {"max_queue_size": 0},
        {"max_batch_delay_ms": -1},
        {"request_timeout_s": 0},
        {"default_top_k": 0},
        {"port": 70000},
        {"torch_threads": 0},
        {"unknown_setting": 1},
    ],
)
def test_out_of_range_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(**bad)


def test_readme_configuration_table_lists_every_setting_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(EVALSERVE_\w+)` \| (.+?) \|", readme, flags=re.MULTILINE))
    for name, field in Settings.model_fields.items():
        variable = f"EVALSERVE_{name.upper()}"
        assert variable in rows, f"{variable} is missing from the README's table"
        shown = "unset" if field.default is None else f"`{field.default}`"
        assert rows[variable] == shown, f"{variable}: README says {rows[variable]}"


def test_a_misspelt_variable_is_refused_naming_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EVALSERVE_MAX_BATCH", "4")  # EVALSERVE_MAX_BATCH_SIZE was meant
    monkeypatch.setenv("evalserve_drain_timout_s", "9")  # lower case is read too
    with pytest.raises(UnknownSetting) as refused:
        Settings()
    message = str(refused.value)
    assert "EVALSERVE_MAX_BATCH (did you mean EVALSERVE_MAX_BATCH_SIZE?)" in message
    assert "evalserve_drain_timout_s (did you mean EVALSERVE_DRAIN_TIMEOUT_S?)" in message


def test_a_variable_like_no_setting_is_refused_without_a_guess(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EVALSERVE_XYZZY", "1")
    with pytest.raises(UnknownSetting, match=r"EVALSERVE_XYZZY: every EVALSERVE_\* variable"):
        Settings()


def test_every_setting_is_a_known_variable() -> None:
    environment = {f"EVALSERVE_{name.upper()}": "" for name in Settings.model_fields}
    check_environment({**environment, "PATH": "/bin", "EVALSERVEX": "not ours"})
