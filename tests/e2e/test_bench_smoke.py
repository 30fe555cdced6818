"""``evalserve bench`` still works end to end (a few seconds): what it reports agrees with the
server's own counts, and it writes its JSON and a real plot. Its speed numbers are not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from support import ROOT

from app.config import Settings

pytestmark = pytest.mark.e2e


def bench(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``evalserve bench`` on the digits model, one second a level, results in ``out``."""
    command = [sys.executable, "-m", "app", "bench", "--model", "digits", "--seconds", "1"]
    return subprocess.run(
        [*command, *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_bench_runs_and_writes_json_and_a_plot(tmp_path: Path) -> None:
    result = bench(tmp_path, "--concurrency", "1", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "in-process limit" in result.stdout
    data = json.loads((tmp_path / "digits-fp32-onnxruntime-cpu.json").read_text())
    assert [level["concurrency"] for level in data["served"]] == [1, 2]
    for level in data["served"]:
        assert level["requests"] > 0
        assert level["errors"] == 0
        # The server counted exactly the requests the bench says it sent in the level.
        assert level["requests"] + level["errors"] == level["server_requests"], level
    lone, pair = data["served"]
    # One client has one image in flight at a time: every batch the server ran held one image.
    assert lone["mean_batch_size"] == 1.0
    # Two clients: never more than two images in a batch.
    assert 1.0 <= pair["mean_batch_size"] <= 2.0
    # The limit is measured at the batch size the server batches to by default.
    assert data["limit"]["batch_size"] == Settings.model_fields["max_batch_size"].default == 16
    assert data["limit"]["images_per_s"] > 0
    assert data["limit"]["single_image_ms"] > 0
    # A real image of the plot's size (figsize (7, 4.2) at 120 dpi), not an empty canvas.
    with Image.open(tmp_path / "digits-fp32-onnxruntime-cpu.png") as plot:
        assert plot.format == "PNG"
        assert plot.size == (840, 504)
        colours = plot.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 16, "the plot is (nearly) blank"


def test_bench_over_grpc_counts_what_the_server_counted(tmp_path: Path) -> None:
    result = bench(tmp_path, "--concurrency", "2", "--protocol", "grpc")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "over gRPC" in result.stdout
    data = json.loads((tmp_path / "digits-fp32-onnxruntime-grpc-cpu.json").read_text())
    assert data["protocol"] == "grpc"
    [level] = data["served"]
    assert level["requests"] > 0
    assert level["errors"] == 0
    # The server's gRPC ModelInfer count, not its HTTP one: every call the bench made.
    assert level["requests"] == level["server_requests"], level
    assert 1.0 <= level["mean_batch_size"] <= 2.0
