"""Fixtures of the deployment tests: each deployment file read once per session (helpers in
deploy_support.py)."""

from __future__ import annotations

from typing import Any

import pytest
from deploy_support import (
    COMPOSE,
    DOCKERFILE,
    KUBERNETES,
    Image,
    compose_config,
    parse_dockerfile,
    rendered,
)


@pytest.fixture(scope="session")
def image() -> Image:
    return Image(parse_dockerfile(DOCKERFILE.read_text()))


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return compose_config(COMPOSE)


@pytest.fixture(scope="session")
def base_manifests() -> dict[str, dict[str, Any]]:
    return rendered(KUBERNETES / "base")


@pytest.fixture(scope="session")
def gpu_manifests() -> dict[str, dict[str, Any]]:
    return rendered(KUBERNETES / "overlays" / "gpu")
