"""The only code that touches torch devices: build, load, eval, warm up and run one model.

Every forward pass runs in the model's own worker thread, under ``torch.inference_mode()`` entered
in that thread; torch's thread count is set in that thread too, since both are per-thread state.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from app import photos
from app.model import exported
from app.model.device_decode import DeviceDecoder
from app.model.exported import ExportError, Forward
from app.model.feed import Staged, StagingBuffers
from app.model.keymaps import KEY_MAPS
from app.model.optimize import (
    CompiledBatches,
    CompileError,
    SplitBatches,
    compile_buckets,
    fold_batchnorm,
)
from app.model.repository import ModelConfigError, ModelSpec
from app.preprocessing import ImageError, ImageTransform, device_decodes
from app.values import (
    EncodedImage,
    Item,
    ModelFacts,
    OutOfMemory,
    Precision,
    PreprocessingFacts,
    Runtime,
    TopK,
)

logger = logging.getLogger("evalserve.runtime")
T = TypeVar("T")


def resolve_device(requested: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; an explicit CUDA device must exist."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {requested!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {requested!r} requested but only {torch.cuda.device_count()} GPUs exist"
            )
    return device


_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def _compute_dtype(spec: ModelSpec, device: torch.device, precision: Precision) -> torch.dtype:
    """The autocast dtype for ``precision`` on ``device``, refusing what the device lacks."""
    if precision == "fp16" and device.type != "cuda":
        # Measured: fp16 autocast on this CPU is 16x slower than fp32. CUDA only.
        raise ModelConfigError(spec.name, "precision fp16 needs a CUDA device; use bf16 on CPU")
    if precision == "bf16":
        supported = (
            torch.cuda.is_bf16_supported()
            if device.type == "cuda"
            else torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
        if not supported:
            raise ModelConfigError(spec.name, f"precision bf16 is not supported on {device}")
    return _DTYPES[precision]


def build_module(spec: ModelSpec) -> nn.Module:
    """The network of ``spec`` with its weights loaded, on the CPU, not yet in eval mode."""
    source = spec.config.model.source
    try:
        if source == "torchscript":
            assert spec.model_file is not None
            return _load_torchscript(spec)
        if source == "export":
            assert spec.model_file is not None
            exported = torch.export.load(str(spec.model_file)).module()
            _require_eval_graph(spec, exported)
            return exported
        module = _build_architecture(spec)
    except ModelConfigError:
        raise
    except Exception as exc:
        raise ModelConfigError(spec.name, f"cannot build the model: {exc}") from exc
    if spec.weights_path is not None:
        _load_weights(spec, module)
    return module


_TRAINING_FLAGS = ("training", "train", "use_input_stats")


def _require_eval_graph(spec: ModelSpec, module: nn.Module) -> None:
    """An exported program cannot be switched to eval mode after export (torch raises on
    ``.eval()``); its mode is baked into the graph. Refuse one captured in train mode."""
    graph = getattr(module, "graph", None)
    for node in graph.nodes if graph is not None else ():
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None:
            continue
        for position, argument in enumerate(schema.arguments):
            if argument.name not in _TRAINING_FLAGS:
                continue
            value = (
                node.args[position]
                if position < len(node.args)
                else node.kwargs.get(argument.name, argument.default_value)
            )
            if value is True:
                raise ModelConfigError(
                    spec.name,
                    f"the exported program runs {node.target} in training mode; "
                    "call model.eval() before torch.export.export",
                )


def _load_torchscript(spec: ModelSpec) -> nn.Module:
    # PyTorch deprecates TorchScript (a FutureWarning on every load) but people still ship it:
    # say so once in our log instead of letting the warning escape into every start-up.
    logger.warning(
        "model %s: TorchScript is deprecated by PyTorch; torch.export (.pt2) is its successor",
        spec.name,
    )
    with warnings.catch_warnings():  # start-up only, so the global filter swap races nothing
        warnings.filterwarnings("ignore", r".*torch\.jit\.load.* is deprecated", FutureWarning)
        module: nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
            str(spec.model_file), map_location="cpu"
        )
    return module


def _build_architecture(spec: ModelSpec) -> nn.Module:
    section = spec.config.model
    assert section.architecture is not None
    kwargs: dict[str, Any] = {"num_classes": len(spec.labels), **section.kwargs}
    if section.source == "timm":
        import timm

        if not timm.is_model(section.architecture):
            raise ModelConfigError(spec.name, f"timm has no architecture {section.architecture!r}")
        return timm.create_model(section.architecture, pretrained=False, **kwargs)
    import torchvision

    if section.architecture not in torchvision.models.list_models():
        raise ModelConfigError(
            spec.name, f"torchvision has no architecture {section.architecture!r}"
        )
    built: nn.Module = torchvision.models.get_model(section.architecture, weights=None, **kwargs)
    return built


def _load_weights(spec: ModelSpec, module: nn.Module) -> None:
    weights = spec.config.weights
    assert weights is not None
    assert spec.weights_path is not None
    try:
        state = torch.load(spec.weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelConfigError(
            spec.name, f"cannot read weights {spec.weights_path}: {exc}"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelConfigError(spec.name, f"weights {spec.weights_path} hold no state dict")
    if weights.key_map is not None:
        if weights.key_map not in KEY_MAPS:
            raise ModelConfigError(
                spec.name,
                f"unknown weights.key_map {weights.key_map!r} (known: {', '.join(KEY_MAPS)})",
            )
        try:
            state = KEY_MAPS[weights.key_map](state, module)
        except KeyError as exc:
            raise ModelConfigError(spec.name, f"key_map {weights.key_map}: {exc}") from exc
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        # torch's message lists every missing/unexpected key; the first lines say enough.
        summary = " ".join(str(exc).split())[:500]
        raise ModelConfigError(
            spec.name, f"weights do not fit the architecture: {summary}"
        ) from exc


_CPU_WORKER: ThreadPoolExecutor | None = None
_CPU_WORKER_LOCK = threading.Lock()


def cpu_worker() -> ThreadPoolExecutor:
    """The one thread that runs torch on the CPU, for every model of the process.

    GNU OpenMP (torch's intra-op threads on Linux) gives each thread that runs a parallel
    region its own team of workers; once the process holds more of them than there are cores,
    it stops spinning and every parallel region sleeps and wakes its team. Measured on 2 cores,
    one EfficientNet-Lite0 image: 14 to 18 ms while a single thread had ever run torch, 28 to 40
    ms once a second had (the loading thread's probe pass, another model's worker). One thread
    keeps one team; and two models computing at once on the same cores would gain nothing."""
    global _CPU_WORKER
    with _CPU_WORKER_LOCK:
        if _CPU_WORKER is None:
            _CPU_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-cpu")
        return _CPU_WORKER


def choose_runtime(
    spec: ModelSpec,
    device: torch.device,
    runtime: Runtime | None,
    precision: Precision | None,
    compile: bool | None,
) -> Runtime:
    """What runs ``spec``: the ``runtime`` setting when given; else model.toml's, which is a CPU
    choice: on CUDA, or when a setting asks for what only torch does (bf16, fp16, compile),
    torch runs the model instead (an explicit runtime setting with those is refused later)."""
    if runtime is not None:
        return runtime
    chosen = spec.config.model.runtime
    wants_torch = [
        reason
        for reason, applies in (
            (f"device {device}", device.type != "cpu"),
            (f"precision {precision}", precision not in (None, "fp32")),
            ("compile", bool(compile)),
        )
        if applies
    ]
    if chosen != "torch" and wants_torch:
        logger.info(
            "model %s: %s asks for torch, which runs it instead of %s",
            spec.name,
            " and ".join(wants_torch),
            chosen,
        )
        return "torch"
    return chosen


def _check_exportable(
    spec: ModelSpec, runtime: Runtime, device: torch.device, precision: Precision, compiled: bool
) -> None:
    """Refuse, at once and by name, what an exported runtime cannot do."""
    if device.type != "cpu":
        raise ModelConfigError(spec.name, f"runtime {runtime} runs on the CPU, not on {device}")
    if precision != "fp32":
        raise ModelConfigError(
            spec.name, f"runtime {runtime} serves fp32 only, not {precision}; use runtime torch"
        )
    if compiled:
        raise ModelConfigError(
            spec.name, f"compile is a torch option; runtime {runtime} compiles on its own"
        )


# inductor options. freezing: the weights become constants that inductor folds and prepacks
# (without it, measured no faster than eager on the CPU). cpp_wrapper, CPU only: the graph runs
# from C++ with the GIL released; inductor's default Python wrapper holds the GIL through each
# fused CPU kernel, which starves the event loop and the decode threads. triton.cudagraphs,
# CUDA only, is what mode="reduce-overhead" sets (torch.compile takes a mode or options, not
# both): each compiled batch size is captured as a CUDA graph at warm-up and replayed, one
# launch instead of one per kernel, which is most of a small model's time on a large GPU.
_COMPILE_OPTIONS: dict[str, dict[str, Any]] = {
    "cpu": {"freezing": True, "cpp_wrapper": True},
    "cuda": {"freezing": True, "triton.cudagraphs": True},
}
# Staging buffers per model (see feed.StagingBuffers): one filling, one copying, one spare.
_STAGING_BUFFERS = 3


class Classifier:
    """One model, loaded once, in eval mode, on its device, run by its own worker thread: by
    torch, or (``runtime``) exported to ONNX Runtime or OpenVINO once proven to compute the
    same logits as the torch module."""

    def __init__(
        self,
        spec: ModelSpec,
        device: torch.device,
        torch_threads: int | None,
        precision: Precision | None = None,
        compile: bool | None = None,
        runtime: Runtime | None = None,
        max_batch_size: int = 16,
        max_image_pixels: int = 40_000_000,
        device_decode: bool | None = None,
    ) -> None:
        self.spec = spec
        self.device = device
        self.precision: Precision = precision or spec.config.model.precision
        self.dtype = _compute_dtype(spec, device, self.precision)
        self.runtime: Runtime = choose_runtime(spec, device, runtime, precision, compile)
        compiled = spec.config.model.compile if compile is None else compile
        if self.runtime != "torch":
            _check_exportable(spec, self.runtime, device, self.precision, compiled)
        self.folded_batchnorms = 0
        # For an exported runtime: its largest logit difference from torch on the probe
        # images, relative to the largest logit (see exported.prove_equal).
        self.max_logit_difference: float | None = None
        self._torch_threads = torch_threads
        # One thread runs every torch computation of this model (loading's probe passes
        # included), so batches never race each other for the same cores, and per-thread torch
        # state is set there. On the CPU it is one thread for every model (cpu_worker).
        self._owns_executor = device.type != "cpu"
        self.executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{spec.name}")
            if self._owns_executor
            else cpu_worker()
        )
        self._worker_ident: int = self.executor.submit(self._init_worker).result()
        # On CUDA the batcher stages the next batch in this thread while the worker computes
        # the current one (app/model/feed.py); elsewhere both steps run in the worker.
        self.stage_executor: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage-{spec.name}")
            if device.type == "cuda"
            else None
        )
        self.module = self.executor.submit(self._load).result()
        self.compiled: CompiledBatches | None = (
            CompiledBatches(self.module, _COMPILE_OPTIONS[self.device.type]) if compiled else None
        )
        # Eager torch on the CPU runs each batch as the cheapest mix of sizes timed at warm-up
        # (optimize.SplitBatches); on a GPU one large pass is cheapest, and an exported
        # runtime measured cheapest per image at the largest batch.
        self.split: SplitBatches | None = (
            SplitBatches(self.module)
            if self.runtime == "torch" and device.type == "cpu" and not compiled
            else None
        )
        pre = spec.preprocessing
        self.transform = ImageTransform.from_spec(pre)
        self.max_batch_size = max_batch_size
        # JPEGs decoded on the device (app/model/device_decode.py): by default on CUDA, where
        # the model allows it ([preprocessing] gpu_decode) and the device can reproduce its
        # preprocessing; ``device_decode`` forces it either way (the CPU tests run it so).
        decodes = device_decode
        if decodes is None:
            decodes = device.type == "cuda" and pre.gpu_decode
        self.device_decoder: DeviceDecoder | None = (
            DeviceDecoder(device, self.transform, max_image_pixels)
            if decodes and device_decodes(self.transform)
            else None
        )
        channels, height, width = spec.input_size
        # The host buffers every batch's uint8 pixels are gathered in (feed.StagingBuffers).
        self._staging = StagingBuffers(
            (max_batch_size, height, width, channels),
            torch.uint8,
            _STAGING_BUFFERS,
            pinned=device.type == "cuda",
        )
        # On CUDA a batch is staged on its own stream, so staging overlaps the computing.
        self._side_stream = (
            torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            if device.type == "cuda"
            else None
        )
        shape = (1, pre.channels, 1, 1)
        # Normalisation runs in float32 whatever the precision; autocast casts at the convs.
        self._mean = torch.tensor(pre.mean, dtype=torch.float32, device=device).view(shape)
        self._std = torch.tensor(pre.std, dtype=torch.float32, device=device).view(shape)
        self._exported: Forward | None = None
        # channels_last for torch (see _load); the layout an exported ONNX graph takes.
        self._memory_format = (
            torch.channels_last if self.runtime == "torch" else torch.contiguous_format
        )
        if self.runtime != "torch":
            self._exported = self.executor.submit(self._export, torch_threads).result()

    def _export(self, threads: int | None) -> Forward:
        """The module in ``self.runtime``, served only once it gives the torch module's logits
        (to ``exported.TOLERANCE`` of the largest, same top-1) on a fixed random probe batch
        and on the shipped photographs."""
        assert self.runtime != "torch"
        probe = self.probe_batch()
        with torch.inference_mode():
            expected = self.module(probe)

        def prove(forward: Forward) -> tuple[float, str | None]:
            with torch.inference_mode():
                return exported.prove_equal(expected, forward(probe))

        try:
            forward, self.max_logit_difference = exported.export(
                self.runtime,
                self.module,
                self.spec.input_size,
                threads,
                prove,
                exported.default_cache(),
            )
        except exported.NotEqual as exc:
            raise ModelConfigError(
                self.spec.name,
                f"the {self.runtime} export does not compute what the torch module does: "
                f'{exc}; serve it with runtime = "torch"',
            ) from exc
        except ExportError as exc:
            raise ModelConfigError(self.spec.name, str(exc)) from exc
        logger.info(
            "model %s runs on %s: logits within %.2g of the largest of torch's on %d probe images",
            self.spec.name,
            self.runtime,
            self.max_logit_difference,
            probe.shape[0],
        )
        return forward

    def probe_batch(self) -> torch.Tensor:
        """A fixed random batch of two and the shipped photographs as the model sees them."""
        transform = ImageTransform.from_spec(self.spec.preprocessing)
        images = [transform(photos.image(name)) for name in photos.NAMES]
        noise = self._noise()
        with torch.inference_mode():
            pictures = self._input_batch(images)
        return torch.cat([noise.to(self.device), pictures]).contiguous(
            memory_format=torch.channels_last
        )

    def _noise(self) -> torch.Tensor:
        """A fixed random float32 batch of two at the model's input size (seeded: the same on
        every start), the probe of folding and of an export's equivalence proof."""
        return torch.randn((2, *self.spec.input_size), generator=torch.Generator().manual_seed(0))

    def _init_worker(self) -> int:
        if self._torch_threads is not None:
            torch.set_num_threads(self._torch_threads)
        return threading.get_ident()

    @property
    def worker_thread_id(self) -> int:
        return self._worker_ident

    @property
    def buckets(self) -> tuple[int, ...]:
        """Batch sizes the compiled model is specialised for; empty when it runs eagerly."""
        return self.compiled.buckets if self.compiled is not None else ()

    def describe(self) -> ModelFacts:
        spec, pre = self.spec, self.spec.preprocessing
        return ModelFacts(
            name=spec.name,
            version=spec.config.model.version,
            source=spec.config.model.source,
            architecture=spec.config.model.architecture,
            labels=spec.labels,
            input_size=spec.input_size,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            compiled_batch_sizes=self.buckets,
            folded_batchnorms=self.folded_batchnorms,
            runtime=self.runtime,
            max_logit_difference=self.max_logit_difference,
            preprocessing=PreprocessingFacts(
                resize=pre.resize,
                crop=pre.crop,
                interpolation=pre.interpolation,
                color_mode=pre.color_mode,
                mean=pre.mean,
                std=pre.std,
                device_decode=self.device_decoder is not None,
            ),
        )

    def _load(self) -> nn.Module:
        module = build_module(self.spec)
        if self.spec.config.model.source == "export":
            # torch refuses .eval() on an exported program; its graph was checked to be in eval
            # mode at load, so make the modules' flags say what the graph does.
            for submodule in module.modules():
                submodule.training = False
        else:
            module.eval()
        for parameter in module.parameters():  # (ScriptModules lack requires_grad_)
            parameter.requires_grad_(False)
        if self.spec.config.model.fold_batchnorm and self.spec.config.model.source in (
            "timm",
            "torchvision",
        ):
            module = self._fold(module)
        try:
            # channels_last: oneDNN and cuDNN convolutions run faster on NHWC (measured 1.4x
            # for EfficientNet-Lite0 on the CPU), and the uint8 input arrives as NHWC anyway.
            module = module.to(self.device).to(memory_format=torch.channels_last)
        except Exception as exc:
            raise ModelConfigError(
                self.spec.name, f"cannot move the model to {self.device}: {exc}"
            ) from exc
        return module

    def _fold(self, module: nn.Module) -> nn.Module:
        """``module`` with its BatchNorms folded into their convolutions (app/model/optimize.py),
        proven on a fixed random probe batch of two."""
        probe = self._noise()
        try:
            folded, self.folded_batchnorms = fold_batchnorm(module, probe)
        except Exception as exc:
            raise ModelConfigError(
                self.spec.name, f"probe forward pass for BatchNorm folding failed: {exc}"
            ) from exc
        if self.folded_batchnorms:
            logger.info(
                "model %s: %d BatchNorms folded into their convolutions",
                self.spec.name,
                self.folded_batchnorms,
            )
        return folded

    def warm_up(self, batch_size: int) -> None:
        """Forward passes in the worker thread, checking the output shape, so serving never
        compiles or plans: a compiled model is compiled here for every size of
        ``compile_buckets(batch_size)``; a compiled model and eager torch on the CPU time a pass
        at each of those sizes to plan how every batch size runs (``optimize.batch_plans``)."""
        channels, height, width = self.spec.input_size
        blank = np.zeros((height, width, channels), dtype=np.uint8)

        def forward(size: int) -> float:
            began = time.perf_counter()
            self.predict_blocking([Item(blank, 1)] * size)
            return time.perf_counter() - began

        planned: CompiledBatches | SplitBatches | None = self.compiled or self.split
        try:
            if planned is None:
                forward(batch_size)
                return
            sizes = compile_buckets(batch_size)
            if self.compiled is not None:
                for size, seconds in self.compiled.compile(sizes, forward).items():
                    logger.info(
                        "model %s: compiled for batches of %d in %.1f s",
                        self.spec.name,
                        size,
                        seconds,
                    )
            # Timed once nothing is compiling any more; the best of three passes.
            costs = {size: min(forward(size) for _ in range(3)) for size in sizes}
        except ModelConfigError:
            raise
        except CompileError as exc:
            raise ModelConfigError(self.spec.name, str(exc)) from exc
        except Exception as exc:
            raise ModelConfigError(self.spec.name, f"warm-up forward pass failed: {exc}") from exc
        planned.plan(costs, batch_size)
        logger.info(
            "model %s: a pass takes %s; batches run as %s",
            self.spec.name,
            ", ".join(f"{1000 * cost:.0f} ms at {size}" for size, cost in costs.items()),
            ", ".join(f"{n}: {'+'.join(map(str, plan))}" for n, plan in planned.plans.items()),
        )

    def _normalised(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) pixels on the device to the normalised float32 model input."""
        # An exported graph takes plain NCHW: reorder the uint8 pixels, 4x less to move than
        # the float32 batch (measured: 10% of the model thread's time went to that copy).
        if self._memory_format == torch.contiguous_format:
            pixels = pixels.contiguous()
        return pixels.float().div_(255.0).sub_(self._mean).div_(self._std)

    def _input_batch(self, arrays: Sequence[np.ndarray | EncodedImage]) -> torch.Tensor:
        """The model input for a batch of uint8 (H, W, C) images, float32 (C, H, W) tensors a
        client normalised itself (the /v2 protocol allows both, in one batch) and/or JPEGs the
        device decodes; raises the error of the first that could not be decoded."""
        staged = self._stage([Item(array, 1) for array in arrays])
        if staged.failures:
            raise next(iter(staged.failures.values()))
        return self._model_input(staged)

    def _stage(self, items: Sequence[Item]) -> Staged:
        """Gather a batch's pixels into a staging buffer and start their copy to the device;
        decode its JPEGs on the device. On CUDA everything is issued on the side stream and
        ``ready`` is recorded after it; nothing here waits for the device."""
        if self._side_stream is None:
            return self._stage_on_stream(items)
        with torch.cuda.device(self.device), torch.cuda.stream(self._side_stream):
            staged = self._stage_on_stream(items)
            staged.ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            staged.ready.record(self._side_stream)
        return staged

    def _stage_on_stream(self, items: Sequence[Item]) -> Staged:
        pixels: dict[int, np.ndarray] = {}  # uint8 (H, W, C), decoded on the CPU
        tensors: dict[int, np.ndarray] = {}  # float32 (C, H, W), normalised by the client
        encoded: dict[int, EncodedImage] = {}  # JPEGs for the device to decode
        for i, item in enumerate(items):
            if isinstance(item.array, EncodedImage):
                encoded[i] = item.array
            elif item.array.dtype == np.uint8:
                pixels[i] = item.array
            else:
                tensors[i] = item.array
        uploaded = self._upload(list(pixels.values())) if pixels else None
        if uploaded is not None and len(pixels) == len(items):
            return Staged(items, uploaded)  # the common case: one copy, nothing else
        # float32 once any item is a client's tensor (the others are normalised into it).
        as_float = bool(tensors)
        batch = torch.zeros(
            (len(items), *self.spec.input_size),
            dtype=torch.float32 if as_float else torch.uint8,
            device=self.device,
        ).contiguous(memory_format=torch.channels_last)
        if uploaded is not None:
            batch[list(pixels)] = self._normalised(uploaded) if as_float else uploaded
        failures: dict[int, ImageError] = {}
        if encoded:
            if self.device_decoder is None:
                raise ModelConfigError(self.spec.name, "this model does not decode on its device")
            for i, decoded in zip(
                encoded, self.device_decoder(list(encoded.values())), strict=True
            ):
                if isinstance(decoded, ImageError):
                    failures[i] = decoded  # its row stays blank; the image gets its error
                else:
                    batch[i] = self._normalised(decoded[None])[0] if as_float else decoded
        if tensors:
            stacked = torch.from_numpy(np.stack(list(tensors.values())))
            batch[list(tensors)] = stacked.to(self.device, dtype=torch.float32)
        return Staged(items, batch, failures=failures)

    def _upload(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """uint8 (H, W, C) images as one (B, C, H, W) channels_last batch on the device: gathered
        in a staging buffer, then one (asynchronous, on CUDA) copy."""
        index, host = self._staging.acquire(len(arrays))
        np.stack(arrays, out=host.numpy())
        # (B, H, W, C) memory seen as (B, C, H, W) is already channels_last: torch keeps it.
        uploaded = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        fence = None
        if self.device.type == "cuda":
            fence = torch.cuda.Event()  # type: ignore[no-untyped-call]
            fence.record(torch.cuda.current_stream(self.device))
        # On the CPU ``uploaded`` is the buffer itself, read before its turn comes again.
        self._staging.release(index, fence)
        return uploaded

    def _model_input(self, staged: Staged) -> torch.Tensor:
        """The staged batch as the model takes it, once the staging stream has delivered it."""
        batch = staged.batch
        if staged.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(staged.ready)
            # Made on the side stream, used on this one: the allocator must not hand its memory
            # to the side stream again before this stream is done with it.
            batch.record_stream(stream)
        if batch.dtype == torch.uint8:
            batch = self._normalised(batch)
        return batch.contiguous(memory_format=self._memory_format)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised batch, by whichever runs this model."""
        if self._exported is not None:
            return self._exported(batch)
        if self.compiled is not None:
            return self.compiled(batch)
        if self.split is not None:
            return self.split(batch)
        logits: torch.Tensor = self.module(batch)
        return logits

    def _checked_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's logits for a normalised batch, checked for shape. Call under inference
        mode, in the worker thread."""
        with torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        ):
            logits = self._forward(batch)
        rows = batch.shape[0]
        if logits.ndim != 2 or logits.shape != (rows, len(self.spec.labels)):
            raise ModelConfigError(
                self.spec.name,
                f"model output has shape {tuple(logits.shape)}, expected "
                f"({rows}, {len(self.spec.labels)}) for {len(self.spec.labels)} labels",
            )
        return logits

    def logits_blocking(self, arrays: Sequence[np.ndarray | EncodedImage]) -> np.ndarray:
        """float32 logits of a batch, computed in the worker thread (for agreement tools)."""

        def run() -> np.ndarray:
            with torch.inference_mode():
                logits = self._checked_logits(self._input_batch(arrays))
                return np.asarray(logits.float().cpu().numpy())

        return self.executor.submit(run).result()

    def stage(self, items: Sequence[Item]) -> Staged:
        """The first step of ``predict`` (see app/model/feed.py), for the stage thread: raises
        ``OutOfMemory`` as ``predict`` does."""
        return self._out_of_memory_as_ours(lambda: self._staged(items))

    def compute(self, staged: Staged) -> list[TopK | Exception]:
        """The second step of ``predict``, in the worker thread: top-k of a staged batch, and
        for an image that could not be decoded its error instead."""
        return self._out_of_memory_as_ours(lambda: self._answers(staged))

    def predict(self, items: Sequence[Item]) -> list[TopK | Exception]:
        """Top-k classes of a batch (for an image that could not be decoded, its error). Runs
        in the worker thread (``self.executor``): use ``submit`` or ``predict_blocking`` from
        anywhere else. Raises ``OutOfMemory`` when the batch did not fit in the device's memory
        (the batcher then tries it in halves)."""
        return self._out_of_memory_as_ours(lambda: self._answers(self._staged(items)))

    def _staged(self, items: Sequence[Item]) -> Staged:
        with torch.inference_mode():
            return self._stage(items)

    def _out_of_memory_as_ours(self, step: Callable[[], T]) -> T:
        try:
            return step()
        except torch.cuda.OutOfMemoryError as exc:
            cause = " ".join(str(exc).split())[:300]
        # Out of the except block, torch's error is gone, and with its traceback the batch's
        # tensors: what they held goes back to the allocator, and its cache to the device.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        raise OutOfMemory(f"out of memory on {self.device}: {cause}")

    def _answers(self, staged: Staged) -> list[TopK | Exception]:
        items = staged.items
        with torch.inference_mode():
            logits = self._checked_logits(self._model_input(staged))
            k = min(max(item.top_k for item in items), logits.shape[1])
            scores, indices = torch.softmax(logits.float(), dim=1).topk(k, dim=1)
            # One device-to-host copy brings every answer back: the class indices travel as
            # float32 beside the scores (exact below 2**24 classes).
            packed = torch.cat([scores, indices.float()], dim=1).cpu()
        rows = packed.tolist()
        answers: list[TopK | Exception] = []
        for i, (row, item) in enumerate(zip(rows, items, strict=True)):
            failure = staged.failures.get(i)
            if failure is not None:
                answers.append(failure)
            else:
                answers.append(TopK(row[: item.top_k], [int(c) for c in row[k : k + item.top_k]]))
        return answers

    def submit(self, items: Sequence[Item]) -> Future[list[TopK | Exception]]:
        """``predict`` in the model's worker thread; the future of its result."""
        return self.executor.submit(self.predict, items)

    def predict_blocking(self, items: Sequence[Item]) -> list[TopK]:
        """``predict`` in the worker thread, waiting for it: for tools and warm-up, never for
        code on the event loop. Raises the error of the first image that could not be decoded."""
        answers = []
        for answer in self.submit(items).result():
            if isinstance(answer, Exception):
                raise answer
            answers.append(answer)
        return answers

    def close(self) -> None:
        """Free the model's own worker thread (the shared CPU worker stays for the others)."""
        if self.stage_executor is not None:
            self.stage_executor.shutdown(wait=True)
        if self._owns_executor:
            self.executor.shutdown(wait=True)
