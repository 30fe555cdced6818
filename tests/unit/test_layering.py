"""The layering the README describes is checked by import-linter (pyproject.toml's
[tool.importlinter]); these tests run it, and prove it fails when a layer reaches down."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """import-linter's verdict on the ``app`` package found in ``tree``."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def copy_of_the_code(tmp_path: Path) -> Path:
    shutil.copytree(
        ROOT / "app", tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__", "static")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_layering_contracts_hold() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("api/health.py", "import torch", "app.api is not allowed to import torch"),
        ("api/models.py", "import app.model.runtime", "app.api is not allowed to import app.model"),
        ("batching.py", "import starlette", "app.batching is not allowed to import starlette"),
        ("serving.py", "import app.tools.bench", "app.serving is not allowed to import app.tools"),
        (
            "preprocessing.py",
            "import torchvision",
            "app.preprocessing is not allowed to import torch",
        ),
    ],
)
def test_a_layer_that_reaches_down_breaks_a_contract(
    tmp_path: Path, module: str, line: str, broken: str
) -> None:
    tree = copy_of_the_code(tmp_path)
    path = tree / "app" / module
    path.write_text(path.read_text() + f"\n{line}  # a shortcut someone took\n")
    result = lint_imports(tree)
    assert result.returncode != 0, result.stdout
    assert broken in " ".join(result.stdout.split())
