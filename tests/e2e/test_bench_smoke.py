"""``evalserve bench`` still works end to end (a few seconds; its numbers are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

pytestmark = pytest.mark.e2e


def test_bench_runs_and_writes_json_and_a_plot(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "bench",
            "--model",
            "digits",
            "--seconds",
            "1",
            "--concurrency",
            "1",
            "2",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "in-process limit" in result.stdout
    data = json.loads((tmp_path / "digits-fp32-cpu.json").read_text())
    assert [level["concurrency"] for level in data["served"]] == [1, 2]
    for level in data["served"]:
        assert level["requests"] > 0 and level["errors"] == 0
        assert level["mean_batch_size"] >= 1.0
        assert level["p50_ms"] <= level["p90_ms"] <= level["p99_ms"]
        assert level["fraction_of_limit"] == pytest.approx(
            level["images_per_s"] / data["limit"]["images_per_s"]
        )
    assert data["limit"]["images_per_s"] > 0 and data["limit"]["single_image_ms"] > 0
    png = tmp_path / "digits-fp32-cpu.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
