"""``evalserve agreement``: how often a reduced precision (bf16, fp16) or an exported runtime
(onnxruntime, openvino) picks the same top-1 class as torch in fp32.

Neither is worth offering without this number: both sides run the served code path
(``Classifier``: same preprocessing, same device, the model built as the server builds it) over
the shipped photographs (app/photos) and crops of them, or over a folder of images given with
``--images``, and the report gives the top-1 agreement, the largest change in a top-1 score and
the largest logit difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast, get_args

import numpy as np
from PIL import Image

from app import photos
from app.model.repository import discover
from app.preprocessing import ImageTransform, decode
from app.values import EXPORTED_RUNTIMES, Precision, Runtime

# What can be compared with torch fp32: a reduced precision, or an exported runtime.
CANDIDATES: tuple[str, ...] = (
    *(p for p in get_args(Precision) if p != "fp32"),
    *EXPORTED_RUNTIMES,
)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})

CROP_FRACTIONS = (0.8, 0.6, 0.4)


def test_images() -> list[Image.Image]:
    """Each shipped photograph (app/photos) and its mirror image, each whole and in
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


def folder_images(folder: Path, max_pixels: int) -> list[Image.Image]:
    """Every image under ``folder`` (e.g. the digits test split), in path order, decoded as the
    server decodes uploads (so a file it would refuse raises ``ImageError`` naming it)."""
    images = [
        decode(path.read_bytes(), str(path), max_pixels)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not images:
        raise FileNotFoundError(f"no images under {folder}")
    return images


@dataclass
class Agreement:
    model: str
    # What was compared with torch fp32 (bf16, fp16, onnxruntime, openvino).
    candidate: str
    device: str
    images: int
    top1_agreement: float
    top1_agreement_95ci: tuple[float, float]
    max_top1_score_change: float
    # Among the images where the two disagree, the largest lead fp32's top class had over its
    # runner-up: small means only near ties flip.
    largest_flipped_margin: float
    # The largest logit difference over all images and classes, and as a fraction of the
    # largest torch fp32 logit.
    max_logit_difference: float
    max_logit_difference_relative: float


def measure(
    repository: Path,
    model: str,
    candidate: str,
    device: str = "auto",
    batch: int = 16,
    images: list[Image.Image] | None = None,
) -> Agreement:
    import torch

    from app.model.runtime import Classifier, resolve_device

    sides: list[tuple[Precision, Runtime]] = [("fp32", "torch")]
    if candidate in ("bf16", "fp16"):
        sides.append((cast(Precision, candidate), "torch"))
    elif candidate in EXPORTED_RUNTIMES:
        sides.append(("fp32", candidate))
    else:
        raise ValueError(f"cannot compare {candidate!r} (one of {', '.join(CANDIDATES)})")
    spec = discover(repository, model)[model]
    transform = ImageTransform.from_spec(spec.preprocessing)
    arrays = [transform(image) for image in (test_images() if images is None else images)]
    where = resolve_device(device)
    logits: list[np.ndarray] = []
    for precision, runtime in sides:
        classifier = Classifier(
            spec, where, torch.get_num_threads(), precision, compile=False, runtime=runtime
        )
        try:
            parts = [
                classifier.logits_blocking(arrays[start : start + batch])
                for start in range(0, len(arrays), batch)
            ]
        finally:
            classifier.close()
        logits.append(np.concatenate(parts))
    return compare(model, candidate, str(where), logits[0], logits[1])


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True))


def compare(
    model: str, candidate: str, device: str, reference: np.ndarray, other: np.ndarray
) -> Agreement:
    """``other``'s logits measured against ``reference``'s (torch fp32), image by image."""
    top, other_top = reference.argmax(axis=1), other.argmax(axis=1)
    agree = top == other_top
    scores, other_scores = _softmax(reference), _softmax(other)
    rows = np.arange(len(reference))
    changes = np.abs(scores[rows, top] - other_scores[rows, top])[agree]
    runner_up = np.sort(scores, axis=1)[:, -2] if scores.shape[1] > 1 else np.zeros(len(rows))
    margins = (scores[rows, top] - runner_up)[~agree]
    difference = float(np.abs(reference - other).max())
    return Agreement(
        model=model,
        candidate=candidate,
        device=device,
        images=len(reference),
        top1_agreement=float(agree.mean()),
        top1_agreement_95ci=wilson_interval(int(agree.sum()), len(reference)),
        max_top1_score_change=float(changes.max()) if changes.size else float("nan"),
        largest_flipped_margin=float(margins.max()) if margins.size else 0.0,
        max_logit_difference=difference,
        max_logit_difference_relative=difference / max(float(np.abs(reference).max()), 1e-12),
    )
