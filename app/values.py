"""Plain values that cross between the layers: torch-free, so the HTTP side and the batcher may
import them without importing the model runtime (import-linter checks this; see pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol, get_args

import numpy as np

# What a model computes in, and what runs it: one definition for the settings, model.toml, the
# model runtime and the command line.
Precision = Literal["fp32", "bf16", "fp16"]
Runtime = Literal["torch", "onnxruntime", "openvino"]
RUNTIMES: tuple[Runtime, ...] = get_args(Runtime)
# The runtimes that run the model exported to ONNX (app/model/exported.py).
EXPORTED_RUNTIMES: tuple[Runtime, ...] = tuple(r for r in RUNTIMES if r != "torch")


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """A JPEG left encoded for the model's device to decode, with its batch (GPU decode): its
    header was read and checked on the CPU (``app.preprocessing.plan_device_decode``), its
    pixels were not. ``orientation`` is its EXIF orientation (1 to 8, 1 upright); ``size`` its
    stored (width, height), before that orientation."""

    name: str
    data: bytes
    orientation: int
    size: tuple[int, int]


class Item(NamedTuple):
    """One image's input to a batch, and how many classes it wants back.

    ``array`` is uint8 ``(H, W, C)`` at the model's input size, or float32 ``(C, H, W)`` that the
    client already normalised (the /v2 protocol allows both, even in one batch), or a JPEG the
    model's device decodes itself (``EncodedImage``, only for a model that decodes on its
    device)."""

    array: np.ndarray | EncodedImage
    top_k: int


class TopK(NamedTuple):
    """One image's answer: its top-k softmax scores and class indices, best first."""

    scores: list[float]
    indices: list[int]


@dataclass(frozen=True, slots=True)
class PreprocessingFacts:
    resize: int | None
    crop: int
    interpolation: str
    color_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # JPEG uploads go to the model encoded, for its device to decode (GPU decode).
    device_decode: bool = False


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What a loaded model is, as plain values: what the API reports about it."""

    name: str
    version: str
    source: str
    architecture: str | None
    labels: tuple[str, ...]
    input_size: tuple[int, int, int]
    device: str
    dtype: str
    compiled_batch_sizes: tuple[int, ...]
    folded_batchnorms: int
    preprocessing: PreprocessingFacts
    # What runs the forward pass (torch, onnxruntime, openvino) and, for an exported runtime,
    # its largest logit difference from torch at start-up, relative to the largest logit.
    runtime: str = "torch"
    max_logit_difference: float | None = None


class OutOfMemory(Exception):
    """A batch did not fit in the device's memory (torch's ``OutOfMemoryError``, left behind in
    the model runtime so that the tensors its traceback holds are freed): a smaller batch may."""


class Runner(Protocol):
    """A loaded model as the serving side sees it (``app.model.runtime.Classifier``)."""

    @property
    def executor(self) -> Executor:
        """The one worker thread every forward pass of this model runs in."""

    def predict(self, items: list[Item]) -> Sequence[TopK | Exception]:
        """Top-k of a batch (for an image its device could not decode, the error instead); call
        only in ``executor``. Raises ``OutOfMemory`` when the batch did not fit in the device's
        memory."""

    def submit(self, items: list[Item]) -> Future[list[TopK | Exception]]:
        """``predict`` in the worker thread."""

    def describe(self) -> ModelFacts: ...

    def close(self) -> None: ...
