"""The compose files, validated by docker-compose 1.29 (``config``): the CPU service builds the
CPU image on the image's port, and the GPU override changes only what a GPU needs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from deploy_support import COMPOSE, COMPOSE_GPU, Image, compose_config, docker_compose_config
from support import ROOT


def test_compose_validation_rejects_an_unknown_key(tmp_path: Path) -> None:
    # Proves `docker-compose config` validates rather than merely parsing YAML.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  evalserve:\n    image: evalserve:cpu\n    stop_grace: 45s\n")
    result = docker_compose_config(broken)
    assert result.returncode != 0, result.stderr
    assert "stop_grace" in result.stderr, result.stderr


def test_compose_builds_the_cpu_image_and_publishes_the_image_port(
    compose: dict[str, Any], image: Image
) -> None:
    service = compose["services"]["evalserve"]
    assert service["image"] == "evalserve:cpu"
    assert service["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert Path(service["build"]["context"]) == ROOT
    assert service["restart"] == "unless-stopped"
    http, grpc = service["ports"]
    http_port, grpc_port = image.one("EXPOSE").split()
    assert str(http["target"]) == http_port == service["environment"]["EVALSERVE_PORT"]
    assert str(grpc["target"]) == grpc_port == service["environment"]["EVALSERVE_GRPC_PORT"]


def test_gpu_override_builds_the_cuda_variant_and_reserves_one_nvidia_gpu() -> None:
    cpu = compose_config(COMPOSE)["services"]["evalserve"]
    gpu = compose_config(COMPOSE, COMPOSE_GPU)["services"]["evalserve"]
    assert gpu["image"] == "evalserve:gpu" != cpu["image"]
    assert re.fullmatch(r"cu\d+", gpu["build"]["args"]["TORCH_VARIANT"])
    assert gpu["environment"]["EVALSERVE_DEVICE"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # Everything else is the CPU service's: same probe, port, volume and stop behaviour.
    for key in ("healthcheck", "ports", "volumes", "stop_grace_period", "stop_signal", "restart"):
        assert gpu[key] == cpu[key], key
