"""The one settings object; every field reads an ``EVALSERVE_``-prefixed environment variable."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.values import Precision, Runtime

PREFIX = "EVALSERVE_"


class UnknownSetting(Exception):
    """An ``EVALSERVE_*`` environment variable that names no setting (a typo, most likely)."""


class Settings(BaseSettings):
    """evalserve's configuration, passed explicitly to ``create_app(settings)``.

    Building one refuses an ``EVALSERVE_*`` environment variable that names no setting, rather
    than ignoring it: a misspelt limit silently left at its default is worse than no start."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="forbid")

    def __init__(self, **values: Any) -> None:
        check_environment(os.environ)
        super().__init__(**values)

    model_repository: Path = Field(
        default=Path("models"),
        description="Directory holding one folder per model, each with a model.toml.",
    )
    default_model: str = Field(
        default="efficientnet_lite0",
        min_length=1,
        description="Model answered by POST /v1/predict; must exist in the repository.",
    )
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Where models run: auto (CUDA when available, else CPU), cpu, cuda or cuda:N.",
    )
    precision: Precision | None = Field(
        default=None,
        description="Every model's precision (fp32, bf16, fp16); unset keeps model.toml's.",
    )
    compile: bool | None = Field(
        default=None,
        description="torch.compile every model (true/false); unset keeps model.toml's.",
    )
    runtime: Runtime | None = Field(
        default=None,
        description="What runs every model (torch, onnxruntime, openvino); unset keeps "
        "model.toml's.",
    )
    max_batch_size: int = Field(
        default=16, ge=1, le=1024, description="Most images in one forward pass."
    )
    max_batch_delay_ms: float = Field(
        default=5.0,
        ge=0.0,
        le=10_000.0,
        description="Longest an image waits for others to join its batch, from its arrival.",
    )
    max_queue_size: int = Field(
        default=256,
        ge=1,
        le=1_000_000,
        description="Images that may wait per model; a request that does not fit gets 503.",
    )
    request_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        le=3600.0,
        description="Longest a request waits for its predictions before it is answered 504.",
    )
    default_top_k: int = Field(
        default=5, ge=1, le=1000, description="Classes returned per image when top_k is not given."
    )
    max_upload_bytes: int = Field(
        default=20 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted, in bytes; larger bodies get 413.",
    )
    max_image_pixels: int = Field(
        default=40_000_000,
        ge=1,
        description="Largest decoded image (width x height); larger ones get 413.",
    )
    max_request_pixels: int = Field(
        default=200_000_000,
        ge=1,
        le=10**12,
        description="Most pixels all of a request's images may decode to; more get 413.",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        le=512,
        description="Intra-op threads of the model's worker thread; unset keeps torch's choice.",
    )
    decode_threads: int = Field(
        default=4, ge=1, le=256, description="Threads that decode and resize uploaded images."
    )
    host: str = Field(default="127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port the HTTP server binds.")
    grpc_port: int = Field(
        default=8001,
        ge=0,
        le=65535,
        description="Port of the gRPC Open Inference Protocol server; 0 turns it off.",
    )
    model_control: bool = Field(
        default=False,
        description="Let clients load, reload and unload models (/v2/repository, gRPC).",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="Server log level."
    )
    ui: bool = Field(
        default=True, description="Serve the try-it page at /; off for locked-down deployments."
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="text: readable lines; json: one JSON object per line."
    )
    api_keys: SecretStr | None = Field(
        default=None,
        description="Comma-separated bearer keys; when set, predict and model routes need one.",
    )
    drain_delay_s: float = Field(
        default=1.0,
        ge=0.0,
        le=600.0,
        description="After SIGTERM, least time new requests get 503 before the port closes.",
    )
    drain_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        le=3600.0,
        description="After SIGTERM, most time to wait for accepted requests before exiting.",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        le=3600.0,
        description="Most time a request body may take to arrive; slower uploads get 408.",
    )
    max_header_bytes: int = Field(
        default=16 * 1024, ge=1024, le=1024 * 1024, description="Largest request head, in bytes."
    )
    keep_alive_s: float = Field(
        default=5.0, gt=0.0, le=600.0, description="Idle keep-alive connections close after this."
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        le=600.0,
        description="Most time a request head may take to arrive; then the connection closes.",
    )
    max_connections: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Most open connections; a connection beyond them is answered 503.",
    )

    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="HTTP front-end processes; above 1 they hand images to the one process "
        "that runs the models, through shared memory.",
    )

    def api_key_list(self) -> list[str]:
        """The configured keys (empty when API keys are off)."""
        if self.api_keys is None:
            return []
        return [key.strip() for key in self.api_keys.get_secret_value().split(",") if key.strip()]


def check_environment(environ: Mapping[str, str]) -> None:
    """Raise ``UnknownSetting`` naming every ``EVALSERVE_*`` variable of ``environ`` that is
    not a setting, with the closest known name."""
    known = [name.upper() for name in Settings.model_fields]
    problems = []
    for variable in sorted(environ):
        name = variable.upper()  # pydantic-settings reads them case-insensitively
        if name.startswith(PREFIX) and name.removeprefix(PREFIX) not in known:
            # Compared without the prefix, which every name shares and would make all close.
            close = difflib.get_close_matches(name.removeprefix(PREFIX), known, n=1, cutoff=0.6)
            hint = f" (did you mean {PREFIX}{close[0]}?)" if close else ""
            problems.append(f"{variable}{hint}")
    if problems:
        raise UnknownSetting(
            "unknown environment variable"
            + ("s " if len(problems) > 1 else " ")
            + "; ".join(problems)
            + ": every EVALSERVE_* variable must name a setting (see the README's Configuration)"
        )
