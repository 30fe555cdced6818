"""What a running server holds, as the HTTP side sees it: its served models, the decode pool,
and the model control that loads and unloads models while it runs.

Torch-free on purpose (import-linter checks it): ``app.serving`` builds these from the model
repository; the routes only read them, and reach the model control through the ``ModelControl``
protocol defined here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from app.batching import Batcher
from app.config import Settings
from app.preprocessing import DecodePool, ImageTransform
from app.values import Item, ModelFacts, Runner, TopK


@dataclass(slots=True)
class ServedModel:
    """One model, loaded and warm, with the batcher that feeds it."""

    classifier: Runner
    batcher: Batcher[Item, TopK]
    transform: ImageTransform
    facts: ModelFacts
    # Requests holding this model, from the route's look-up to the answer (see ``lease``).
    users: int = 0

    @property
    def name(self) -> str:
        return self.facts.name

    @contextmanager
    def lease(self) -> Iterator[None]:
        """Around one request's use of the model. A model that is unloaded or replaced while
        requests hold it is stopped only once they let go (or their time is up), so a request
        that found it but had not yet queued its images (still reading or decoding them) is
        answered by it rather than refused by a stopped batcher."""
        self.users += 1
        try:
            yield
        finally:
            self.users -= 1

    @property
    def busy(self) -> bool:
        """Some request holds the model, or has announced images it is still decoding."""
        return self.users > 0 or self.batcher.announced > 0

    @property
    def labels(self) -> tuple[str, ...]:
        return self.facts.labels

    def describe(self) -> ModelFacts:
        """Plain facts about the model: what /v1/models and /v2 metadata report."""
        return self.facts


ModelState = Literal["READY", "UNAVAILABLE", "LOADING", "UNLOADING"]


@dataclass(frozen=True, slots=True)
class RepositoryEntry:
    """One model of the repository, as the model-repository extension's index reports it
    (Triton's names for the states)."""

    name: str
    version: str
    state: ModelState
    # Why it is not READY ("unloaded", the load failure, ...); "" when there is nothing to say.
    reason: str


class ModelControlError(Exception):
    """Base of the model control's refusals; the message is for people."""


class ModelControlDisabled(ModelControlError):
    """Model control is off (EVALSERVE_MODEL_CONTROL is not true)."""


class UnknownModel(ModelControlError):
    """No such model: not in the repository (load), or not loaded (unload)."""


class ModelLoadFailed(ModelControlError):
    """The model could not be loaded; the message is the cause. What was served still is."""


class ModelControlRefused(ModelControlError):
    """The operation is not allowed (unloading the default model, or the server is stopping)."""


class ModelControl(Protocol):
    """Loads, reloads and unloads models while the server runs (the Open Inference Protocol's
    model-repository extension). The same object answers HTTP and gRPC; each protocol maps the
    exceptions above to its own status codes. Operations on one model are serialised."""

    async def index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        """Every model of the repository and every model served, by name (only the READY ones
        with ``ready_only``)."""
        ...

    async def load(self, name: str) -> None:
        """Load the model ``name`` from the repository, or reload it from its changed files when
        it is served: returns once it is warm and serving."""
        ...

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: returns once its accepted requests are answered and it is
        freed."""
        ...


class NoModelControl:
    """The model control of a ``Serving`` that was given none: every operation is refused."""

    async def index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        del ready_only  # nothing to list
        raise ModelControlDisabled("this server has no model control")

    async def load(self, name: str) -> None:
        raise ModelControlDisabled(f"this server has no model control (to load {name!r})")

    async def unload(self, name: str) -> None:
        raise ModelControlDisabled(f"this server has no model control (to unload {name!r})")


@dataclass(slots=True)
class Serving:
    settings: Settings
    models: dict[str, ServedModel]
    decode_pool: DecodePool
    ready: bool = False
    # app.serving.open_serving sets its RepositoryControl, which refuses every operation
    # (ModelControlDisabled) unless the model_control setting is on.
    control: ModelControl = field(default_factory=NoModelControl)

    @property
    def default_model(self) -> ServedModel:
        return self.models[self.settings.default_model]

    def failed_models(self) -> list[str]:
        """Models whose batch loop died: they can answer nothing any more."""
        return [name for name, model in self.models.items() if model.batcher.death is not None]

    def stalled_models(self) -> list[str]:
        """Models whose batch has computed for longer than the request timeout (a hung forward
        pass): nothing they queue is answered in time until it returns."""
        return [name for name, model in self.models.items() if model.batcher.stalled]
