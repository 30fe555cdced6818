"""LitServe serving evalserve's default model, as a LitServe user would, for the one-client
comparison in the README's benchmark section.

A benchmark peer: not a test, not a dependency (``pip install litserve`` first). It serves the
very module evalserve serves on torch (built, BatchNorm-folded, channels_last, eval mode, by
evalserve's own ``Classifier``), so the two differ only in their serving stack::

    .venv/bin/python bench/peers/litserve_server.py --port 8200   # POST /predict, multipart `file`

``bench/peers/one_client.py`` starts it, evalserve on torch and evalserve as configured, one
after the other, and measures each with one client.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import litserve as ls
import torch

from app.model.repository import discover
from app.model.runtime import Classifier
from app.preprocessing import ImageTransform, load_image
from app.values import Item, TopK

MODELS = Path(__file__).resolve().parents[2] / "models"


class Classify(ls.LitAPI):  # type: ignore[misc]
    def setup(self, device: str) -> None:
        spec = discover(MODELS)["efficientnet_lite0"]
        self.classifier = Classifier(spec, torch.device(device), None, runtime="torch")
        self.transform = ImageTransform.from_spec(spec.preprocessing)
        self.labels = spec.labels

    # Unannotated on purpose: LitServe reads the annotation to choose how to parse the body,
    # and only a bare parameter gets the multipart form.
    def decode_request(self, request) -> Any:  # type: ignore[no-untyped-def]
        return load_image(request["file"].file.read(), "upload", 40_000_000, self.transform)

    def predict(self, array: Any) -> TopK:
        # In the thread that built the model, as a LitServe model built in setup() is run in
        # setup()'s thread: a second thread running torch costs a second OpenMP team (see
        # app.model.runtime.cpu_worker), which would slow the peer, not measure it.
        return self.classifier.predict_blocking([Item(array, 5)])[0]

    def encode_response(self, top: TopK) -> dict[str, Any]:
        return {
            "classes": [
                {"label": self.labels[index], "index": index, "score": score}
                for score, index in zip(top.scores, top.indices, strict=True)
            ]
        }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8200)
    port = parser.parse_args().port
    ls.LitServer(Classify(), accelerator="cpu", workers_per_device=1, timeout=30).run(port=port)
