"""Write requirements/lock.txt and requirements/lock-cuda.txt from the virtual environment.

    .venv/bin/python scripts/write_lock.py          # (re)write both files
    .venv/bin/python scripts/write_lock.py --check  # exit 1 if either file differs

The lock holds exact versions of [project.dependencies] of pyproject.toml and everything they
need, as installed here; tests/deploy/test_locks.py checks the committed files against the same
rendering.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
LOCK_CUDA = ROOT / "requirements" / "lock-cuda.txt"
COMMAND = "python scripts/write_lock.py"
# Extras the default configuration needs, locked and installed in the image with the rest: the
# shipped models run on ONNX Runtime (see README, "Runtimes").
DEFAULT_EXTRAS = ("onnxruntime",)
# Packages that only the CUDA build of torch pulls in; the CPU wheel needs none of them.
CUDA_BUILD_ONLY = re.compile(r"^(nvidia-|cuda-|triton$)")

LOCK_HEADER = f"""\
# Exact versions of evalserve's runtime dependencies: [project.dependencies] of pyproject.toml,
# its onnxruntime extra (the default runtime) and everything they need, as installed in the
# project's virtual environment. torch and torchvision
# carry no local version (+cpu, +cu130): the Dockerfile's TORCH_VARIANT picks the wheel.
# Regenerate: {COMMAND}
"""
LOCK_CUDA_HEADER = f"""\
# Constraints for the packages only torch's CUDA build pulls in (CUDA runtime libraries, cuDNN,
# NCCL, triton), as installed in the project's virtual environment. The Dockerfile passes this
# file with -c: it pins them for TORCH_VARIANT=cu130 and installs nothing for the CPU build.
# Regenerate: {COMMAND}
"""


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def runtime_closure() -> dict[str, str]:
    """Name -> installed version of every distribution [project.dependencies] and the default
    extras need here."""
    project = pyproject()["project"]
    wanted = list(project["dependencies"])
    for extra in DEFAULT_EXTRAS:
        wanted += project["optional-dependencies"][extra]
    pending = [
        requirement
        for requirement in map(Requirement, wanted)
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


def render_locks() -> tuple[str, str]:
    """The text of lock.txt and lock-cuda.txt for this environment."""
    closure = runtime_closure()
    common = [f"{n}=={v}\n" for n, v in sorted(closure.items()) if not CUDA_BUILD_ONLY.match(n)]
    cuda = [f"{n}=={v}\n" for n, v in sorted(closure.items()) if CUDA_BUILD_ONLY.match(n)]
    return LOCK_HEADER + "".join(common), LOCK_CUDA_HEADER + "".join(cuda)


def main(argv: list[str]) -> int:
    if argv not in ([], ["--check"]):
        print(f"usage: {COMMAND} [--check]", file=sys.stderr)
        return 2
    files = dict(zip((LOCK, LOCK_CUDA), render_locks(), strict=True))
    if argv == ["--check"]:
        stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
        for path in stale:
            print(f"{path.relative_to(ROOT)} is not what {COMMAND} writes", file=sys.stderr)
        return 1 if stale else 0
    LOCK.parent.mkdir(exist_ok=True)
    for path, text in files.items():
        path.write_text(text)
    print(f"wrote {LOCK.relative_to(ROOT)} and {LOCK_CUDA.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
