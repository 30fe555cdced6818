"""``evalserve agreement``: how often a reduced precision picks the same top-1 class as fp32.

A precision other than fp32 is only worth offering with this number measured: both precisions
run the served code path (``Classifier.predict``, same preprocessing, same device) over the
shipped photographs (app/tools/photos) and crops of them, and the report gives the top-1
agreement and the largest change in any top-1 score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from app.model.repository import Precision, discover
from app.preprocessing import ImageTransform
from app.tools import photos
from app.values import Item, TopK

CROP_FRACTIONS = (0.8, 0.6, 0.4)


def test_images() -> list[Image.Image]:
    """Each shipped photograph (app/tools/photos) and its mirror image, each whole and in
    overlapping crops of 80%, 60% and 40% of its size on a 3x3 grid: 8 x 2 x 28 = 448 images.
    Small crops matter: a crop that loses the subject is where two classes come close, and
    where a lower precision flips."""
    images = []
    for name in photos.NAMES:
        with Image.open(photos.path(name)) as photo:
            image = photo.convert("RGB")
        for view in (image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
            images.append(view)
            width, height = view.size
            for fraction in CROP_FRACTIONS:
                crop_w, crop_h = int(width * fraction), int(height * fraction)
                for row in range(3):
                    for column in range(3):
                        left = column * (width - crop_w) // 2
                        top = row * (height - crop_h) // 2
                        images.append(view.crop((left, top, left + crop_w, top + crop_h)))
    return images


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a proportion (Wilson score): with a few hundred images, one
    flip moves the agreement by a fraction of a percent, so the estimate needs its error bar."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    spread = math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    half = z * spread / (1 + z * z / trials)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class Agreement:
    model: str
    precision: str
    device: str
    images: int
    top1_agreement: float
    top1_agreement_95ci: tuple[float, float]
    max_top1_score_change: float
    # Among the images where the precisions disagree, the largest lead fp32's top class had over
    # its runner-up: small means only near ties flip.
    largest_flipped_margin: float


def measure(
    repository: Path, model: str, precision: Precision, device: str = "auto", batch: int = 16
) -> Agreement:
    import torch

    from app.model.runtime import Classifier, resolve_device

    spec = discover(repository)[model]
    transform = ImageTransform.from_spec(spec.preprocessing)
    arrays = [transform(image) for image in test_images()]
    where = resolve_device(device)
    tops: dict[str, list[TopK]] = {}
    for candidate in ("fp32", precision):
        classifier = Classifier(spec, where, torch.get_num_threads(), candidate)
        try:
            results = []
            for start in range(0, len(arrays), batch):
                chunk = [Item(array, 2) for array in arrays[start : start + batch]]
                results += classifier.predict_blocking(chunk)
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
    margins = [
        a[0][0] - a[0][1]
        for a, b in zip(reference, reduced, strict=True)
        if a[1][0] != b[1][0] and len(a[0]) > 1
    ]
    return Agreement(
        model=model,
        precision=precision,
        device=str(where),
        images=len(arrays),
        top1_agreement=agree / len(arrays),
        top1_agreement_95ci=wilson_interval(agree, len(arrays)),
        max_top1_score_change=float(np.max(changes)) if changes else float("nan"),
        largest_flipped_margin=float(np.max(margins)) if margins else 0.0,
    )
