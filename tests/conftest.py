"""Test-session hooks. Helpers live in support.py."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_test_split(tmp_path_factory: pytest.TempPathFactory):
    """The digits model's held-out split, written as PNGs in ImageFolder layout."""
    from support import digits_trainer

    out = tmp_path_factory.mktemp("digits-test")
    count = digits_trainer().export_test_split(out)
    assert count == 360
    return out
