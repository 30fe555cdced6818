"""``evalserve agreement``: how often a reduced precision (bf16, fp16) or an exported runtime
(onnxruntime, openvino) picks the same top-1 class as torch in fp32; or (``gpu_decode``) how
often JPEGs decoded on the model's device (nvJPEG and a tensor resize, app/model/device_decode.py)
give the same top-1 class as the same JPEGs decoded and resized on the CPU by Pillow.

Neither is worth offering without this number: both sides run the served code path
(``Classifier``: same preprocessing, same device, the model built as the server builds it) over
the shipped photographs (app/photos) and crops of them, or over a folder of images given with
``--images``, and the report gives the top-1 agreement, the largest change in a top-1 score and
the largest logit difference.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast, get_args

import numpy as np
from PIL import Image

from app import photos
from app.model.repository import ModelConfigError, discover
from app.preprocessing import (
    ImageTransform,
    decode,
    device_decodes,
    load_image,
    plan_device_decode,
)
from app.values import EXPORTED_RUNTIMES, EncodedImage, Precision, Runtime

# What can be compared with torch fp32: a reduced precision, an exported runtime, or decoding
# JPEGs on the model's device.
GPU_DECODE = "gpu_decode"
CANDIDATES: tuple[str, ...] = (
    *(p for p in get_args(Precision) if p != "fp32"),
    *EXPORTED_RUNTIMES,
    GPU_DECODE,
)
# The quality the test images are encoded at for the gpu_decode comparison (a web upload's).
JPEG_QUALITY = 90
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

    if candidate == GPU_DECODE:
        return _measure_device_decode(repository, model, device, batch, images)
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


def _measure_device_decode(
    repository: Path, model: str, device: str, batch: int, images: list[Image.Image] | None
) -> Agreement:
    """The test images as JPEGs, decoded by the CPU path (Pillow) and by the model's device
    (on a CPU device, libjpeg and the same tensor resize), both run by torch in fp32."""
    import torch

    from app.model.runtime import Classifier, resolve_device

    spec = discover(repository, model)[model]
    transform = ImageTransform.from_spec(spec.preprocessing)
    if not device_decodes(transform):
        raise ModelConfigError(
            model, "its preprocessing decodes on the CPU only (RGB, bilinear or bicubic needed)"
        )
    uploads = []
    for image in test_images() if images is None else images:
        encoded = io.BytesIO()
        image.convert("RGB").save(encoded, "JPEG", quality=JPEG_QUALITY)
        uploads.append(encoded.getvalue())
    max_pixels = 10 * max(image_size(data) for data in uploads)
    cpu_side: list[np.ndarray | EncodedImage] = [
        load_image(data, f"image {i}", max_pixels, transform) for i, data in enumerate(uploads)
    ]
    device_side: list[np.ndarray | EncodedImage] = []
    for i, data in enumerate(uploads):
        planned = plan_device_decode(data, f"image {i}", max_pixels, transform)[1]
        if planned is None:
            raise ValueError(f"image {i} would not be decoded on the device")
        device_side.append(planned)
    where = resolve_device(device)
    classifier = Classifier(
        spec,
        where,
        torch.get_num_threads(),
        "fp32",
        compile=False,
        runtime="torch",
        max_image_pixels=max_pixels,
        device_decode=True,
    )
    try:
        logits = [
            np.concatenate(
                [
                    classifier.logits_blocking(side[start : start + batch])
                    for start in range(0, len(side), batch)
                ]
            )
            for side in (cpu_side, device_side)
        ]
    finally:
        classifier.close()
    return compare(model, GPU_DECODE, str(where), logits[0], logits[1])


def image_size(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    return width * height


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
