"""Runtimes other than torch: the eval-mode module, exported to ONNX once at load, run by ONNX
Runtime or OpenVINO on the CPU. Either is only served after ``prove_equal`` shows it computes
what the torch module computes (see ``app.model.runtime.Classifier``).

Both runtimes run the same ONNX graph: torch's exporter (dynamo-based; the legacy TorchScript
exporter for TorchScript sources) with a dynamic batch dimension, so no batch size is compiled
while serving. OpenVINO reads that graph rather than converting the module itself: its PyTorch
front end cannot trace a ``torch.export`` program, and measured on EfficientNet-Lite0 the graph
from ONNX ran a batch of 16 in 89 ms against 104 ms for its own conversion.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.values import Runtime

logger = logging.getLogger("evalserve.runtime")

# The pip extra that brings each runtime (and what exporting to ONNX needs).
EXTRAS: dict[str, str] = {"onnxruntime": "onnxruntime", "openvino": "openvino"}

# The exported model's logits must match torch's to this fraction of the largest logit, with the
# same top-1 class for every probe image (measured: about 1e-6 of it for EfficientNet-Lite0).
TOLERANCE = 1e-4

Forward = Callable[[torch.Tensor], torch.Tensor]


class ExportError(RuntimeError):
    """The module cannot be exported to, or run by, the runtime; the message says why."""


def available(runtime: Runtime) -> bool:
    """Whether ``runtime`` and what exporting for it needs are installed."""
    if runtime == "torch":
        return True
    import importlib.util

    needed = ["onnx", "onnxscript", "onnxruntime" if runtime == "onnxruntime" else "openvino"]
    return all(importlib.util.find_spec(name) is not None for name in needed)


def to_onnx(module: nn.Module, input_size: tuple[int, int, int]) -> bytes:
    """The ONNX graph of eval-mode ``module`` for float32 (N, C, H, W) batches, N dynamic."""
    example = torch.zeros((2, *input_size))
    # Export is start-up work: its warnings (deprecations in the exporters) are not the
    # server's to show, and must not escape into every start-up.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if isinstance(module, torch.jit.ScriptModule):
            # torch.export cannot trace TorchScript: the legacy exporter can.
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "model.onnx"
                torch.onnx.export(
                    module,
                    (example,),
                    path,
                    dynamo=False,
                    input_names=["input"],
                    output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                )
                return path.read_bytes()
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            input_names=["input"],
            output_names=["logits"],
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    return bytes(program.model_proto.SerializeToString())


class OnnxRuntimeForward:
    """An ONNX graph run by ONNX Runtime's CPU provider, in the caller's thread."""

    def __init__(self, graph: bytes, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Its worker threads otherwise spin after each run, taking the cores the decode pool
        # and the event loop need (measured below, in the bench; see the README).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.numpy(), dtype=np.float32)  # NCHW, as exported
        (logits,) = self._session.run(None, {self._input: array})
        return torch.from_numpy(np.asarray(logits))


class OpenVinoForward:
    """An ONNX graph compiled by OpenVINO for the CPU in float32, run in the caller's thread."""

    def __init__(self, graph: bytes, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(io.BytesIO(graph))
        config: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": threads,
            # On CPUs with bf16 OpenVINO would otherwise compute in bf16: not the same answers.
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }
        self._request = core.compile_model(model, "CPU", config).create_infer_request()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.numpy(), dtype=np.float32)
        result = self._request.infer({0: array})
        # The output lives in OpenVINO's buffer, reused by the next request: copy it out.
        return torch.from_numpy(np.array(result[0], dtype=np.float32))


def default_cache() -> Path:
    """Where exported graphs are kept between starts (one folder per user, as inductor's)."""
    return Path(tempfile.gettempdir()) / f"evalserve-{os.getuid()}" / "onnx"


def fingerprint(module: nn.Module, input_size: tuple[int, int, int]) -> str:
    """A digest of what the graph is exported from: every parameter and buffer, the input size
    and the exporter's versions. (The equivalence proof still runs on every start.)"""
    import importlib.metadata

    digest = hashlib.sha256(repr((type(module).__qualname__, input_size)).encode())
    for package in ("torch", "onnx", "onnxscript"):
        digest.update(f"{package}={importlib.metadata.version(package)};".encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _keep(path: Path, graph: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_bytes(graph)
        partial.replace(path)  # atomic: a concurrent start never reads half a graph
    except OSError as exc:  # a read-only disk serves all the same, exporting every start
        logger.info("cannot keep the exported graph in %s: %s", path.parent, exc)


def _load(runtime: Runtime, graph: bytes, threads: int) -> Forward:
    try:
        if runtime == "onnxruntime":
            return OnnxRuntimeForward(graph, threads)
        return OpenVinoForward(graph, threads)
    except Exception as exc:
        raise ExportError(f"{runtime} cannot load the exported model: {exc}") from exc


class NotEqual(ExportError):
    """The exported model does not compute what the torch module does."""

    def __init__(self, difference: float, problem: str) -> None:
        super().__init__(problem)
        self.difference = difference


def export(
    runtime: Runtime,
    module: nn.Module,
    input_size: tuple[int, int, int],
    threads: int | None,
    prove: Callable[[Forward], tuple[float, str | None]],
    cache: Path | None = None,
) -> tuple[Forward, float]:
    """``module`` (eval mode, on the CPU) exported and loaded into ``runtime``, once ``prove``
    accepts it (it returns the difference from torch, and why that is too much or None); with
    the difference. A graph exported from this very module before is taken from ``cache`` (about
    6 s saved per start for EfficientNet-Lite0); a graph is only kept there once proven, and a
    cached one that fails the proof is exported afresh."""
    if not available(runtime):
        raise ExportError(
            f"runtime {runtime} is not installed: pip install 'evalserve[{EXTRAS[runtime]}]'"
        )
    cores = threads or os.cpu_count() or 1
    path = cache / f"{fingerprint(module, input_size)}.onnx" if cache is not None else None
    cached = path.read_bytes() if path is not None and path.is_file() else None
    difference, problem = float("inf"), None
    for graph in ([cached] if cached is not None else []) + [None]:
        from_cache = graph is not None
        if graph is None:
            try:
                graph = to_onnx(module, input_size)
            except Exception as exc:
                raise ExportError(f"cannot export the model to ONNX for {runtime}: {exc}") from exc
        forward = _load(runtime, graph, cores)
        try:
            difference, problem = prove(forward)
        except Exception as exc:  # a graph that cannot even run the probe proves nothing
            difference, problem = float("inf"), f"it fails on the probe batch: {exc}"
        if problem is None:
            if path is not None and not from_cache:
                _keep(path, graph)
            return forward, difference
    raise NotEqual(difference, problem or "not proven")


def largest_difference(expected: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(largest absolute logit difference, largest absolute logit of ``expected``)."""
    return (
        float((expected.float() - got.float()).abs().max()),
        float(expected.float().abs().max()),
    )


def prove_equal(expected: torch.Tensor, got: torch.Tensor) -> tuple[float, str | None]:
    """The largest difference of ``got``'s logits from ``expected``'s, relative to the largest
    logit, and why they are not equal enough (None when they are): within ``TOLERANCE`` of the
    largest logit, with the same top-1 class for every row."""
    if got.shape != expected.shape:
        return float("inf"), f"logits of shape {tuple(got.shape)}, not {tuple(expected.shape)}"
    difference, scale = largest_difference(expected, got)
    relative = difference / max(scale, 1e-12)
    if not relative <= TOLERANCE:
        return relative, (
            f"logits differ by up to {difference:.3g} ({relative:.3g} of the largest logit, "
            f"{scale:.3g}; the limit is {TOLERANCE:g})"
        )
    flipped = int((expected.argmax(dim=1) != got.argmax(dim=1)).sum())
    if flipped:
        return relative, f"the top-1 class differs for {flipped} of {len(expected)} probe images"
    return relative, None
