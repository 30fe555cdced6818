"""``evalserve evaluate``: accuracy of a model over a labelled folder, in process or over HTTP.

DATA_DIR is in torchvision ImageFolder layout: one folder per class, named by the model's label.
In process, the model is loaded exactly as the server loads it (eval mode, inference mode in its
worker thread) and fed by a batching DataLoader with the server's own preprocessing. With a URL,
every image is sent to a running server and accuracy is counted from the responses, and the
requests the client had to send again (a connection lost before an answer, or a 503) are
counted and reported. Either way, an unreadable image is reported by path and counted, not fatal.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.client import AsyncClient, EvalserveError, Retried

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TOP_K = 5


class DatasetError(Exception):
    """DATA_DIR cannot be evaluated against the model (missing, empty, unknown classes)."""


@dataclass(frozen=True, slots=True)
class Sample:
    path: Path
    label: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """One image's result: its top labels, best first, or why it could not be read."""

    sample: Sample
    top: tuple[str, ...] = ()
    error: str | None = None


def scan(data_dir: Path, labels: Sequence[str]) -> list[Sample]:
    """Every image under ``data_dir/<label>/``; folders must be named by the model's labels."""
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir} is not a directory")
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir())
    if not folders:
        raise DatasetError(f"{data_dir} has no class folders (ImageFolder layout: DIR/<label>/*)")
    known = set(labels)
    unknown = [f.name for f in folders if f.name not in known]
    if unknown:
        raise DatasetError(
            f"{len(unknown)} folder name(s) match no label of the model: "
            + ", ".join(repr(name) for name in unknown)
        )
    samples = [
        Sample(path, folder.name)
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not samples:
        raise DatasetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {data_dir}")
    return samples


@dataclass
class ClassAccuracy:
    total: int
    correct: int
    accuracy: float


@dataclass
class Report:
    model: str
    source: str
    images: int
    evaluated: int
    top1: float
    top5: float
    images_per_s: float
    seconds: float
    per_class: dict[str, ClassAccuracy]
    confused: list[dict[str, Any]]
    unreadable: list[dict[str, str]]
    predictions: list[dict[str, str]] = field(repr=False)
    # Over HTTP: requests sent again, by cause (connection, overloaded); None in process.
    retries: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    model: str,
    source: str,
    outcomes: Sequence[Outcome],
    seconds: float,
    retried: Retried | None = None,
) -> Report:
    read = [o for o in outcomes if o.error is None]
    top1 = sum(o.top[0] == o.sample.label for o in read)
    top5 = sum(o.sample.label in o.top[:TOP_K] for o in read)
    per_class: dict[str, ClassAccuracy] = {}
    for label in sorted({o.sample.label for o in read}):
        mine = [o for o in read if o.sample.label == label]
        correct = sum(o.top[0] == label for o in mine)
        per_class[label] = ClassAccuracy(len(mine), correct, correct / len(mine))
    mistakes = Counter((o.sample.label, o.top[0]) for o in read if o.top[0] != o.sample.label)
    return Report(
        model=model,
        source=source,
        images=len(outcomes),
        evaluated=len(read),
        top1=top1 / len(read) if read else 0.0,
        top5=top5 / len(read) if read else 0.0,
        images_per_s=len(outcomes) / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        per_class=per_class,
        confused=[
            {"label": truth, "predicted": guess, "count": count}
            for (truth, guess), count in mistakes.most_common(10)
        ],
        unreadable=[
            {"path": str(o.sample.path), "error": o.error} for o in outcomes if o.error is not None
        ],
        predictions=[
            {"path": str(o.sample.path), "label": o.sample.label, "predicted": o.top[0]}
            for o in read
        ],
        retries=asdict(retried) if retried is not None else None,
    )


def format_report(report: Report) -> str:
    lines = [
        f"model {report.model} ({report.source})",
        f"images {report.images}, evaluated {report.evaluated}, "
        f"unreadable {len(report.unreadable)}",
        f"top-1 accuracy {report.top1:.2%}   top-5 accuracy {report.top5:.2%}",
        f"{report.images_per_s:.1f} images/s ({report.seconds:.2f} s)",
    ]
    if report.retries is not None:
        lines.append(
            f"retries: {report.retries['connection']} after a lost connection, "
            f"{report.retries['overloaded']} after a 503"
        )
    lines += [
        "",
        f"{'class':<24} {'images':>7} {'correct':>8} {'accuracy':>9}",
    ]
    for label, row in report.per_class.items():
        lines.append(f"{label[:24]:<24} {row.total:>7} {row.correct:>8} {row.accuracy:>9.2%}")
    if report.confused:
        lines += ["", "most confused (label -> predicted: count)"]
        lines += [f"  {c['label']} -> {c['predicted']}: {c['count']}" for c in report.confused]
    if report.unreadable:
        lines += ["", "unreadable images"]
        lines += [f"  {u['path']}: {u['error']}" for u in report.unreadable]
    return "\n".join(lines)


Progress = Callable[[int], None]


def _batches(items: Sequence[Sample], size: int) -> Iterable[Sequence[Sample]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate_in_process(
    model_dir: Path,
    samples: Sequence[Sample],
    *,
    device: str = "auto",
    batch_size: int = 64,
    workers: int = 0,
    torch_threads: int | None = None,
    max_image_pixels: int = 40_000_000,
    progress: Progress = lambda _: None,
) -> tuple[list[Outcome], float]:
    """Outcomes in ``samples`` order and the seconds the evaluation loop took."""
    import torch.utils.data

    from app.model.repository import load_spec
    from app.model.runtime import Classifier, resolve_device
    from app.preprocessing import ImageError, ImageTransform, load_image
    from app.values import Item

    spec = load_spec(model_dir)
    transform = ImageTransform.from_spec(spec.preprocessing)

    class Images(torch.utils.data.Dataset[tuple[int, Any, str | None]]):
        def __len__(self) -> int:
            return len(samples)

        def __getitem__(self, index: int) -> tuple[int, Any, str | None]:
            sample = samples[index]
            try:
                data = sample.path.read_bytes()
                return index, load_image(data, sample.path.name, max_image_pixels, transform), None
            except (ImageError, OSError) as exc:
                return index, None, str(exc)

    loader = torch.utils.data.DataLoader(
        Images(), batch_size=batch_size, num_workers=workers, collate_fn=list
    )
    classifier = Classifier(spec, resolve_device(device), torch_threads)
    labels = spec.labels
    k = min(TOP_K, len(labels))
    outcomes: dict[int, Outcome] = {}
    try:
        start = time.perf_counter()
        for batch in loader:
            good = [(index, array) for index, array, _ in batch if array is not None]
            for index, _, error in batch:
                if error is not None:
                    outcomes[index] = Outcome(samples[index], error=error)
            if good:
                # The model's own worker thread, under inference mode, as in the server.
                results = classifier.predict_blocking([Item(array, k) for _, array in good])
                for (index, _), (_, indices) in zip(good, results, strict=True):
                    outcomes[index] = Outcome(samples[index], tuple(labels[i] for i in indices))
            progress(len(batch))
        seconds = time.perf_counter() - start
    finally:
        classifier.close()
    return [outcomes[i] for i in range(len(samples))], seconds


async def _evaluate_remote(
    url: str,
    model: str,
    samples: Sequence[Sample],
    concurrency: int,
    request_timeout: float,
    progress: Progress,
) -> tuple[list[Outcome], float, Retried]:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with AsyncClient(url, timeout=request_timeout, limits=limits) as client:

        async def one(sample: Sample) -> Outcome:
            async with gate:
                try:
                    data = sample.path.read_bytes()
                except OSError as exc:
                    outcome = Outcome(sample, error=f"{sample.path.name}: {exc}")
                else:
                    try:
                        prediction = await client.predict(data, TOP_K, model=model)
                    except EvalserveError as exc:
                        if exc.status_code not in (400, 413):
                            raise
                        outcome = Outcome(sample, error=exc.message)
                    else:
                        outcome = Outcome(sample, tuple(c.label for c in prediction.classes))
            progress(1)
            return outcome

        start = time.perf_counter()
        outcomes = await asyncio.gather(*(one(sample) for sample in samples))
        return list(outcomes), time.perf_counter() - start, client.retried


def evaluate_remote(
    url: str,
    model: str,
    samples: Sequence[Sample],
    *,
    concurrency: int = 8,
    timeout: float = 60.0,
    progress: Progress = lambda _: None,
) -> tuple[list[Outcome], float, Retried]:
    """Send every image to the server at ``url``: outcomes in ``samples`` order, the seconds it
    took, and the requests the client sent again (see ``app.client``)."""
    return asyncio.run(_evaluate_remote(url, model, samples, concurrency, timeout, progress))
