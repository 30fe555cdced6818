"""What a running server holds, as the HTTP side sees it: its served models and the decode pool.

Torch-free on purpose (import-linter checks it): ``app.serving`` builds these from the model
repository; the routes only read them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from app.batching import Batcher
from app.config import Settings
from app.preprocessing import ImageTransform
from app.values import Item, ModelFacts, Runner, TopK


@dataclass(slots=True)
class ServedModel:
    """One model, loaded and warm, with the batcher that feeds it."""

    classifier: Runner
    batcher: Batcher[Item, TopK]
    transform: ImageTransform
    facts: ModelFacts

    @property
    def name(self) -> str:
        return self.facts.name

    @property
    def labels(self) -> tuple[str, ...]:
        return self.facts.labels

    def describe(self) -> ModelFacts:
        """Plain facts about the model: what /v1/models and /v2 metadata report."""
        return self.facts


@dataclass(slots=True)
class Serving:
    settings: Settings
    models: dict[str, ServedModel]
    decode_pool: ThreadPoolExecutor
    ready: bool = False

    @property
    def default_model(self) -> ServedModel:
        return self.models[self.settings.default_model]

    def failed_models(self) -> list[str]:
        """Models whose batch loop died: they can answer nothing any more."""
        return [name for name, model in self.models.items() if model.batcher.death is not None]
