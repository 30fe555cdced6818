"""bench/gpu_check.sh on a machine without a GPU: it says it skipped everything, exits 0 at once,
and writes nothing. (What it does on a GPU can only run on one.)"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from support import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.sh"
BASH = shutil.which("bash")


def run_without_gpu(path: str, out: Path) -> subprocess.CompletedProcess[str]:
    assert BASH is not None
    return subprocess.run(
        [BASH, str(SCRIPT)],
        env={"PATH": path, "OUT": str(out), "HOME": str(out)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def bin_with(tmp_path: Path, *tools: str) -> Path:
    """A folder holding only ``tools`` (links to this machine's), for a PATH of just those."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in tools:
        found = shutil.which(tool)
        assert found is not None, tool
        os.symlink(found, folder / tool)
    return folder


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_gpu_check_without_nvidia_smi_skips_everything(tmp_path: Path) -> None:
    tools = bin_with(tmp_path, "dirname", "head")
    out = tmp_path / "out"
    result = run_without_gpu(str(tools), out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "no GPU: skipped everything\n"
    assert result.stderr == ""
    assert not out.exists()


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_gpu_check_skips_everything_when_nvidia_smi_finds_no_gpu(tmp_path: Path) -> None:
    # An nvidia-smi that finds no GPU (as on a machine with the driver but no device): it fails.
    tools = bin_with(tmp_path, "dirname", "head")
    fake = tools / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'No devices were found' >&2\nexit 6\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    result = run_without_gpu(f"{tools}:{os.environ['PATH']}", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "no GPU: skipped everything\n"
    assert not out.exists()


def test_gpu_check_is_valid_bash() -> None:
    assert BASH is not None
    subprocess.run([BASH, "-n", str(SCRIPT)], check=True, timeout=30)
    subprocess.run([BASH, "-n", str(ROOT / "bench" / "fetch_gpu_wheels.sh")], check=True)
