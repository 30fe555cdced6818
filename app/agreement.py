"""``evalserve agreement``: how often a reduced precision picks the same top-1 class as fp32.

A precision other than fp32 is only worth offering with this number measured: both precisions
run the served code path (``Classifier.predict``, same preprocessing, same device) over the
repository's test photographs and crops of them, and the report gives the top-1 agreement and
the largest change in any top-1 score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from app.bench import FIXTURES, PHOTOS
from app.preprocessing import ImageTransform
from app.repository import Precision, discover


def test_images() -> list[Image.Image]:
    """Each photograph, its mirror image, and nine overlapping crops of 60% of its size."""
    images = []
    for name in PHOTOS:
        with Image.open(FIXTURES / f"{name}.jpg") as photo:
            image = photo.convert("RGB")
        images += [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
        width, height = image.size
        crop_w, crop_h = int(width * 0.6), int(height * 0.6)
        for row in range(3):
            for column in range(3):
                left = column * (width - crop_w) // 2
                top = row * (height - crop_h) // 2
                images.append(image.crop((left, top, left + crop_w, top + crop_h)))
    return images


@dataclass
class Agreement:
    model: str
    precision: str
    device: str
    images: int
    top1_agreement: float
    max_top1_score_change: float


def measure(
    repository: Path, model: str, precision: Precision, device: str = "auto", batch: int = 16
) -> Agreement:
    import torch

    from app.runtime import Classifier, resolve_device

    spec = discover(repository)[model]
    transform = ImageTransform.from_spec(spec.preprocessing)
    arrays = [transform(image) for image in test_images()]
    where = resolve_device(device)
    tops: dict[str, list[tuple[list[float], list[int]]]] = {}
    for candidate in ("fp32", precision):
        classifier = Classifier(spec, where, torch.get_num_threads(), candidate)
        try:
            results = []
            for start in range(0, len(arrays), batch):
                chunk = [(array, 1) for array in arrays[start : start + batch]]
                results += classifier.executor.submit(classifier.predict, chunk).result()
            tops[candidate] = results
        finally:
            classifier.close()
    reference, reduced = tops["fp32"], tops[precision]
    agree = sum(a[1][0] == b[1][0] for a, b in zip(reference, reduced, strict=True))
    # Compare the fp32 winner's score under both precisions where they agree.
    changes = [
        abs(a[0][0] - b[0][0])
        for a, b in zip(reference, reduced, strict=True)
        if a[1][0] == b[1][0]
    ]
    return Agreement(
        model=model,
        precision=precision,
        device=str(where),
        images=len(arrays),
        top1_agreement=agree / len(arrays),
        max_top1_score_change=float(np.max(changes)) if changes else float("nan"),
    )
