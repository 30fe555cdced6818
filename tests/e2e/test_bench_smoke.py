"""``evalserve bench`` still works end to end (a few seconds): what it reports agrees with the
server's own counts, and it writes its JSON and a real plot. Its speed numbers are not checked."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from support import ROOT
from torchvision import transforms

from app.config import Settings
from app.tools import bench as bench_module
from app.tools import null_model

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


def null_model_logits(jpeg: bytes) -> torch.Tensor:
    """The null model's forward pass on ``jpeg``, computed apart from evalserve: torchvision's
    transforms with efficientnet_lite0's preprocessing, then each channel's mean over a 3x3
    grid of the image, channel-major (red top-left, red top-centre, ...)."""
    with Image.open(io.BytesIO(jpeg)) as image:
        rgb = image.convert("RGB")
    transform = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    pixels = transform(rgb)
    # Adaptive average pooling's cells over 224 pixels: [floor(224 i / 3), ceil(224 (i + 1) / 3)).
    cells = [slice(0, 75), slice(74, 150), slice(149, 224)]
    return torch.stack(
        [
            pixels[channel, row, column].mean()
            for channel in range(3)
            for row in cells
            for column in cells
        ]
    )


def test_bench_null_model_serves_the_null_forward_pass(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "app", "bench", "--null-model", "--seconds", "1"]
    result = subprocess.run(
        [*command, "--concurrency", "2", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "null model" in result.stdout
    assert "front end" in result.stdout
    # Named apart from the real model's results; served as the model it stands in for is.
    data = json.loads(
        (tmp_path / "null-model-efficientnet_lite0-fp32-onnxruntime-cpu.json").read_text()
    )
    assert data["model"] == "null"
    assert data["null_model"] == {"stands_in_for": "efficientnet_lite0"}
    assert data["runtime"] == "onnxruntime"
    [level] = data["served"]
    assert level["requests"] > 0
    assert level["errors"] == 0
    # The server counted exactly the requests the bench says it sent in the level.
    assert level["requests"] + level["errors"] == level["server_requests"], level
    assert 1.0 <= level["mean_batch_size"] <= 2.0
    assert data["limit"]["images_per_s"] > 0
    # The server answered the first image the bench sent with the null model's forward pass.
    [answer] = data["probe"]["predictions"]
    assert data["probe"]["model"] == "null"
    scores = torch.softmax(null_model_logits(bench_module.web_jpegs()[0]), 0)
    top = int(scores.argmax())
    best = answer["classes"][0]
    assert best["index"] == top, (answer, scores)
    assert best["label"] == null_model.labels("RGB")[top]
    assert best["score"] == pytest.approx(float(scores[top]), abs=1e-4)
    assert len(answer["classes"]) == Settings.model_fields["default_top_k"].default
