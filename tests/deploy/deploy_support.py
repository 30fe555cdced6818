"""Shared helpers of the deployment tests (imported as ``deploy_support``; fixtures built on them
are in conftest.py): the Dockerfile read the way the container sees it, compose files rendered
by docker-compose, kustomizations rendered as kustomize does, Kubernetes schema validation, and
the command-line tools the checks run. Every tool is installed by ``make test``; a missing one
fails with the command that installs it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from support import ROOT

BIN = Path(sys.executable).parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
# Kubernetes releases whose API schemas the manifests must satisfy: an older one still in wide
# use, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.28", kubernetes_validate.latest_version())


# ---------------------------------------------------------------------------------------------
# Tools


def tool(name: str, install: str) -> str:
    """The path of a command-line tool: the virtual environment's first, then PATH's."""
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; {install} (make test does this)")
    return found


def run_tool(*command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def seconds(duration: str | int | float) -> float:
    """A Docker/compose duration ("45s", "5m", "1m30s", "1h") in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|ns)", duration)
    assert parts, f"not a duration: {duration}"
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    return sum(float(number) * scale[unit] for number, unit in parts)


# ---------------------------------------------------------------------------------------------
# Dockerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    stage: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order, continuation lines joined and comments dropped, with their stage."""
    instructions: list[Instruction] = []
    stage = -1
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not logical):
            continue  # comment lines end nothing, even inside a continuation
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, value = logical.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), value.strip(), stage))
        logical = ""
    assert not logical, "the Dockerfile ends inside a continuation line"
    return instructions


@dataclass(frozen=True)
class Image:
    """What the final stage of the Dockerfile says about the container."""

    instructions: list[Instruction]

    @property
    def final(self) -> list[Instruction]:
        last = max(i.stage for i in self.instructions)
        return [i for i in self.instructions if i.stage == last]

    def one(self, keyword: str) -> str:
        values = [i.value for i in self.final if i.keyword == keyword]
        assert len(values) == 1, f"the final stage needs exactly one {keyword}, has {values}"
        return values[0]

    @property
    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for instruction in self.final:
            if instruction.keyword == "ENV":
                for token in shlex.split(instruction.value):
                    key, equals, value = token.partition("=")
                    assert equals, f"ENV {instruction.value!r}: use the KEY=VALUE form"
                    env[key] = value
        return env

    @property
    def start_command(self) -> list[str]:
        entrypoint = [i.value for i in self.final if i.keyword == "ENTRYPOINT"]
        command = exec_form(self.one("CMD"), "CMD")
        return [*(exec_form(entrypoint[-1], "ENTRYPOINT") if entrypoint else []), *command]

    @property
    def healthcheck(self) -> tuple[dict[str, float], list[str]]:
        """The HEALTHCHECK's options (in seconds, or a count) and its exec-form command."""
        options, separator, command = self.one("HEALTHCHECK").partition("CMD ")
        assert separator, "HEALTHCHECK needs a CMD"
        values = dict(re.findall(r"--([a-z-]+)=(\S+)", options))
        parsed = {k: float(v) if k == "retries" else seconds(v) for k, v in values.items()}
        return parsed, exec_form(command, "HEALTHCHECK CMD")

    @property
    def copies(self) -> list[tuple[str, str]]:
        """(source in the build context, destination) of the final stage's COPY lines."""
        pairs = []
        for instruction in self.final:
            words = instruction.value.split()
            if instruction.keyword == "COPY" and not any(w.startswith("--from") for w in words):
                paths = [w for w in words if not w.startswith("--")]
                pairs += [(source, paths[-1]) for source in paths[:-1]]
        return pairs

    def on_this_checkout(self, value: str) -> str:
        """A value with the image's copied directories replaced by this checkout's."""
        for source, destination in self.copies:
            destination = destination.rstrip("/")
            if value == destination or value.startswith(destination + "/"):
                return str(ROOT / source.rstrip("/")) + value[len(destination) :]
        return value


def exec_form(value: str, what: str) -> list[str]:
    try:
        command = json.loads(value)
    except json.JSONDecodeError:
        pytest.fail(f"{what} is not in exec (JSON) form: {value}")
    assert isinstance(command, list), value
    assert all(isinstance(c, str) for c in command), value
    assert command, f"{what} is empty"
    return command


# ---------------------------------------------------------------------------------------------
# Compose


def docker_compose_config(*files: Path) -> subprocess.CompletedProcess[str]:
    compose = tool("docker-compose", "apt-get install docker-compose (Debian's, 1.29)")
    return run_tool(compose, *(a for f in files for a in ("-f", str(f))), "config")


def compose_config(*files: Path) -> dict[str, Any]:
    result = docker_compose_config(*files)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


# ---------------------------------------------------------------------------------------------
# Kubernetes


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# Strategic-merge keys of the list fields the overlay patches (k8s.io/api patchMergeKey); other
# lists are replaced, as kustomize does.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            assert not key.startswith("$"), f"patch directive {key} is not rendered here"
            merged[key] = strategic_merge(base[key], value, key) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        originals = {item[key]: item for item in base}
        # Patched items first, in the patch's order, then the untouched ones (kustomize's order).
        merged_items = [
            strategic_merge(originals[item[key]], item) if item[key] in originals else item
            for item in patch
        ]
        patched = {item[key] for item in patch}
        return merged_items + [copy.deepcopy(i) for i in base if i[key] not in patched]
    return copy.deepcopy(patch)


def pod_containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    spec = resource.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("containers", []), *spec.get("initContainers", [])]


def identify(resource: dict[str, Any]) -> tuple[str, str]:
    return resource["kind"], resource["metadata"]["name"]


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """kustomize build, for the fields these kustomizations use (an unknown one fails)."""
    [kustomization] = load_yaml(directory / "kustomization.yaml")
    unknown = set(kustomization) - {"apiVersion", "kind", "resources", "patches", "images"}
    assert not unknown, f"{directory}: {sorted(unknown)} are not rendered by this test"
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        resources += render_kustomization(path) if path.is_dir() else load_yaml(path)
    for patch_entry in kustomization.get("patches", []):
        assert set(patch_entry) == {"path"}, f"only strategic-merge patch files: {patch_entry}"
        for patch in load_yaml(directory / patch_entry["path"]):
            identity = (patch["kind"], patch["metadata"]["name"])
            targets = [i for i, r in enumerate(resources) if identify(r) == identity]
            assert len(targets) == 1, f"patch {patch_entry['path']} targets no {identity}"
            target = resources[targets[0]]
            names = {c["name"] for c in pod_containers(target)}
            for container in pod_containers(patch):
                assert container["name"] in names, f"the patch adds a container {container['name']}"
            resources[targets[0]] = strategic_merge(target, patch)
    for rule in kustomization.get("images", []):
        for resource in resources:
            for container in pod_containers(resource):
                name, _, tag = container["image"].partition(":")
                if name == rule["name"]:
                    container["image"] = f"{rule.get('newName', name)}:{rule.get('newTag', tag)}"
    return resources


def by_kind(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = {r["kind"]: r for r in resources}
    assert len(kinds) == len(resources), "one resource per kind expected"
    return kinds


def rendered(directory: Path) -> dict[str, dict[str, Any]]:
    """The kustomization rendered in Python, and checked against kubectl/kustomize if present."""
    resources = by_kind(render_kustomization(directory))
    if kubectl := shutil.which("kubectl"):
        command = [kubectl, "kustomize", str(directory)]
    elif kustomize := shutil.which("kustomize"):
        command = [kustomize, "build", str(directory)]
    else:
        return resources
    result = run_tool(*command)
    assert result.returncode == 0, result.stderr
    assert by_kind(list(yaml.safe_load_all(result.stdout))) == resources
    return resources


def validate_kubernetes(resource: dict[str, Any]) -> None:
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(map(str, error.path))
            pytest.fail(
                f"{resource['kind']} invalid for Kubernetes {version}: {where}: {error.message}"
            )
