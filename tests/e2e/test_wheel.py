"""evalserve as a user installs it: a wheel in a fresh virtual environment, run from a folder
that holds only a model repository (no checkout, so no tests/ to lean on). ``evalserve bench``
and ``evalserve agreement`` once read their photographs from tests/fixtures and broke exactly
there; now they ship as package data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from support import MODELS, ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the evalserve command of a fresh venv holding only the wheel, a working folder)."""
    base = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip"]
    build = ["wheel", "--no-deps", "--no-build-isolation", "-q", "--wheel-dir", str(base / "dist")]
    subprocess.run(
        [*pip, *build, str(ROOT)],
        check=True,
        timeout=300,
    )
    [wheel] = (base / "dist").glob("evalserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "app/photos/chelsea.jpg" in names
    assert "app/static/favicon.ico" in names
    assert not any(name.startswith("tests/") for name in names)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # The dependencies (torch alone is gigabytes) come from the test environment through a .pth
    # path entry: its editable evalserve is not on that path, so `app` is the wheel's only.
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        timeout=300,
    )
    work = base / "work"
    shutil.copytree(MODELS, work / "models", ignore=shutil.ignore_patterns("train.py"))
    return venv / "bin" / "evalserve", work


def run(command: list[str], work: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        command,
        cwd=work,
        env={**environment, "EVALSERVE_DEVICE": "cpu", "EVALSERVE_GRPC_PORT": "0"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_the_wheel_is_what_runs(installed: tuple[Path, Path]) -> None:
    evalserve, work = installed
    python = evalserve.parent / "python"
    where = run([str(python), "-c", "import app; print(app.__file__)"], work)
    assert where.stdout.strip().startswith(str(evalserve.parents[1])), where.stdout
    version = run([str(evalserve), "--version"], work)
    assert version.returncode == 0
    assert version.stdout.startswith("evalserve ")


def test_bench_runs_from_the_wheel(installed: tuple[Path, Path]) -> None:
    evalserve, work = installed
    result = run(
        [str(evalserve), "bench", "--seconds", "3", "--concurrency", "1", "--out", "results"],
        work,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "in-process limit" in result.stdout
    assert (work / "results" / "efficientnet_lite0-fp32-onnxruntime-cpu.json").is_file()


@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no bf16 support"
)
def test_agreement_runs_from_the_wheel(installed: tuple[Path, Path]) -> None:
    evalserve, work = installed
    result = run([str(evalserve), "agreement", "bf16", "--json"], work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"images": 448' in result.stdout
