"""The null model of ``evalserve bench --null-model``: a forward pass that does next to nothing,
served exactly as a real model, so the bench measures what the front end sustains (HTTP, JSON,
decode and preprocessing, batching, one process) with the model's cost taken out.

Its forward pass is the mean of each input channel over a 3x3 grid of the image (one read of
the pixels): 27 logits for an RGB input, 9 for a grayscale one, enough for the server's default
top 5. It takes the decode and preprocessing of the model it stands in for (resize, crop,
interpolation, colour mode, mean and std), and its runtime, so every image costs the front end
and the model's thread what it costs when that model is served, less the forward pass. It is
written as a real model repository: a ``torch.export`` program (``model.pt2``, source
``export``) with its model.toml and labels, built by the torch that will load it.

``python -m app.tools.null_model DIR`` writes one, to serve it yourself
(``EVALSERVE_MODEL_REPOSITORY=DIR``) and benchmark it with ``evalserve bench --url URL
--null-model``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from app.config import Settings
from app.model.repository import ModelSpec, discover

NAME = "null"
GRID = 3
_COLOURS = {"RGB": ("red", "green", "blue"), "L": ("gray",)}
_ROWS = ("top", "middle", "bottom")
_COLUMNS = ("left", "centre", "right")


def cells(size: int) -> list[tuple[int, int]]:
    """The GRID spans of ``size`` pixels, as adaptive average pooling takes them:
    ``[floor(size * i / GRID), ceil(size * (i + 1) / GRID))``."""
    return [(size * i // GRID, -(-size * (i + 1) // GRID)) for i in range(GRID)]


class GridMeans(nn.Module):
    """Each channel's mean over a GRID x GRID grid of a ``size`` x ``size`` image:
    (B, C, size, size) -> (B, C * GRID * GRID), channel-major (all of channel 0's cells, row by
    row, then channel 1's, ...): adaptive average pooling, written as slices and means because
    torch's ONNX exporter unrolls adaptive pooling over sizes GRID does not divide (minutes)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.spans = cells(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = [
            x[:, :, top:bottom, left:right].mean((2, 3))
            for top, bottom in self.spans
            for left, right in self.spans
        ]
        return torch.stack(means, dim=2).flatten(1)


def labels(color_mode: str) -> list[str]:
    """The null model's class names, in output order: ``red top-left``, ``red top-centre``, ..."""
    return [
        f"{colour} {row}-{column}"
        for colour in _COLOURS[color_mode]
        for row in _ROWS
        for column in _COLUMNS
    ]


def _toml_value(value: object) -> str:
    # JSON's strings, numbers, booleans and arrays of them are also TOML's.
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def write_repository(directory: Path, original: ModelSpec) -> Path:
    """Write the model repository ``directory`` holding the model ``null``, standing in for
    ``original``: its preprocessing, and its runtime (on the CPU, ONNX Runtime runs the shipped
    models; evalserve picks torch on CUDA); returns the model's folder."""
    preprocessing = original.preprocessing
    folder = directory / NAME
    folder.mkdir(parents=True, exist_ok=True)
    channels, size = preprocessing.channels, preprocessing.crop
    # Exported in eval mode (it has no training behaviour, but evalserve checks the graph),
    # for any batch size, at the input size the preprocessing produces.
    module = GridMeans(size).eval()
    example = (torch.zeros(2, channels, size, size),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(module, example, dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "model.pt2"))
    (folder / "labels.txt").write_text("\n".join(labels(preprocessing.color_mode)) + "\n")
    settings = preprocessing.model_dump(exclude_none=True)
    lines = [
        "# The null model of `evalserve bench --null-model` (app/tools/null_model.py): each",
        f"# channel's mean over a {GRID}x{GRID} grid, standing in for {original.name}.",
        "",
        "[model]",
        'source = "export"',
        'file = "model.pt2"',
        f'runtime = "{original.config.model.runtime}"',
        "",
        "[labels]",
        'file = "labels.txt"',
        "",
        "[preprocessing]",
        *(f"{key} = {_toml_value(value)}" for key, value in settings.items()),
    ]
    (folder / "model.toml").write_text("\n".join(lines) + "\n")
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.tools.null_model",
        description="Write a model repository holding the null model of evalserve bench "
        "--null-model, with the preprocessing of a model of the repository "
        "(EVALSERVE_MODEL_REPOSITORY).",
    )
    parser.add_argument("directory", type=Path, metavar="DIR")
    parser.add_argument(
        "--like", help="whose preprocessing and runtime to take (default: EVALSERVE_DEFAULT_MODEL)"
    )
    args = parser.parse_args(argv)
    settings = Settings()
    like = args.like or settings.default_model
    spec = discover(settings.model_repository, like)[like]
    folder = write_repository(args.directory, spec)
    print(f"wrote {folder} (the model {NAME!r}, standing in for {like})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
