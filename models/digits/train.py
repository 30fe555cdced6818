"""Train the `digits` model: a small CNN on scikit-learn's handwritten digits (8x8, 10 classes).

    python models/digits/train.py                        # train, write model.pt2 + labels + toml
    python models/digits/train.py --export-test-split DIR   # held-out images as PNGs by class

The split is fixed and seeded, training is deterministic (same seed, one thread, deterministic
kernels), and the model runs in eval mode for validation: dropout off, BatchNorm on its running
statistics, gradients off. The served model is a ``torch.export`` program captured in eval mode.

Images are stored as the server will see them: 8-bit grayscale PNGs, white ink on black, where
pixel = round(value * 255 / 16) for the dataset's 0..16 values. Training uses exactly that
quantisation, so a PNG of the test split lands where the training data lay.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 20261124
TEST_FRACTION = 0.2
LABELS = [str(d) for d in range(10)]
SIDE = 8


class DigitsNet(nn.Module):
    """Three conv blocks with BatchNorm, then Dropout and a linear classifier."""

    def __init__(self, classes: int = 10, dropout: float = 0.3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 2x2
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(64 * 2 * 2, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class Split:
    """Pixels as uint8 (N, 8, 8), 0..255, and integer targets."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def load_split() -> Split:
    digits = load_digits()
    pixels = np.rint(digits.images * 255.0 / 16.0).astype(np.uint8)
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, digits.target, test_size=TEST_FRACTION, random_state=SEED, stratify=digits.target
    )
    return Split(train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def to_tensor(pixels: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """The server's normalisation: uint8 / 255, then (x - mean) / std."""
    return (torch.from_numpy(pixels).float().div(255.0).sub(mean).div(std)).unsqueeze(1)


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel: handwriting is never perfectly centred."""
    shifts = torch.randint(-1, 2, (2,), generator=generator).tolist()
    return torch.roll(batch, shifts=shifts, dims=(2, 3))


@dataclass
class Result:
    model: DigitsNet
    mean: float
    std: float
    test_accuracy: float


def train(epochs: int = 40, batch_size: int = 64, seed: int = SEED, log: bool = True) -> Result:
    seed_everything(seed)
    split = load_split()
    mean = float(split.train_x.mean() / 255.0)
    std = float(split.train_x.std() / 255.0)
    data = {
        "train": (to_tensor(split.train_x, mean, std), torch.from_numpy(split.train_y)),
        "val": (to_tensor(split.test_x, mean, std), torch.from_numpy(split.test_y)),
    }
    model = DigitsNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    accuracy = 0.0
    for epoch in range(1, epochs + 1):
        report = []
        for phase in ("train", "val"):
            if phase == "train":
                model.train()
            else:
                model.eval()
            inputs, targets = data[phase]
            order = (
                torch.randperm(len(targets), generator=generator)
                if phase == "train"
                else torch.arange(len(targets))
            )
            total_loss, correct = 0.0, 0
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                x, y = inputs[index], targets[index]
                if phase == "train":
                    x = augment(x, generator)
                    optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    logits = model(x)
                    loss = loss_fn(logits, y)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                total_loss += loss.item() * len(y)
                correct += int((logits.argmax(1) == y).sum())
            accuracy = correct / len(targets)
            report.append(f"{phase} loss {total_loss / len(targets):.4f} acc {accuracy:.4f}")
        schedule.step()
        if log:
            print(f"epoch {epoch:2d}  " + "  ".join(report))
    model.eval()
    return Result(model, mean, std, accuracy)


MODEL_TOML = """\
# A small CNN (BatchNorm + Dropout) trained on scikit-learn's handwritten digits by train.py.
# Held-out test accuracy at training time: {accuracy:.4f} ({test} images, seed {seed}).
# model.pt2 is a torch.export program captured in eval mode. It is served on ONNX Runtime,
# exported at load and proven to give torch's logits (evalserve's README, "Runtimes").

[model]
source = "export"
file = "model.pt2"
runtime = "onnxruntime"

[labels]
file = "labels.txt"

[preprocessing]
# Uploads become 8x8 grayscale, white ink on black, as the training data.
resize = {side}
crop = {side}
interpolation = "bilinear"
color_mode = "L"
mean = [{mean:.6f}]
std = [{std:.6f}]
"""


def write_model(result: Result, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    example = (torch.zeros(2, 1, SIDE, SIDE),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(result.model, example, dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "model.pt2"))
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    split = load_split()
    (folder / "model.toml").write_text(
        MODEL_TOML.format(
            accuracy=result.test_accuracy,
            test=len(split.test_y),
            seed=SEED,
            side=SIDE,
            mean=result.mean,
            std=result.std,
        )
    )


def export_test_split(out: Path) -> int:
    """Write the held-out split as ``out/<label>/<index>.png``; returns the image count."""
    from PIL import Image

    split = load_split()
    for number, (pixels, target) in enumerate(zip(split.test_x, split.test_y, strict=True)):
        folder = out / LABELS[target]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{number:04d}.png")
    return len(split.test_y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=HERE, help="where to write the model")
    parser.add_argument(
        "--export-test-split",
        type=Path,
        metavar="DIR",
        help="write the held-out test images as PNGs in ImageFolder layout, and stop",
    )
    args = parser.parse_args()
    if args.export_test_split:
        count = export_test_split(args.export_test_split)
        print(f"wrote {count} test images to {args.export_test_split}")
        return
    result = train(args.epochs)
    write_model(result, args.out)
    print(f"test accuracy {result.test_accuracy:.4f}; model written to {args.out}")


if __name__ == "__main__":
    main()
