"""BatchNorm folding keeps what the model computes, and refuses what it cannot prove."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from support import MODELS, PHOTOS, photo
from torch import nn

from app.model.optimize import SplitBatches, batch_plans, compile_buckets, fold_batchnorm
from app.model.repository import discover
from app.model.runtime import build_module
from app.preprocessing import ImageTransform


def probe(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


def photos_batch() -> torch.Tensor:
    spec = discover(MODELS)["efficientnet_lite0"]
    transform = ImageTransform.from_spec(spec.preprocessing)
    arrays = [transform(Image.open(io.BytesIO(photo(name)))) for name in PHOTOS]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(spec.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.preprocessing.std).view(1, 3, 1, 1)
    return (batch - mean) / std


def test_default_model_folds_every_batchnorm_and_keeps_its_logits() -> None:
    spec = discover(MODELS)["efficientnet_lite0"]
    model = build_module(spec).eval()
    before = batchnorms(model)
    folded, count = fold_batchnorm(model, probe(2, 3, 224, 224))
    assert before == 49
    assert count == 49
    assert batchnorms(folded) == 0
    assert not any(m.training for m in folded.modules())
    assert batchnorms(model) == 49  # the original is left as it was
    with torch.inference_mode():
        images = photos_batch()
        expected, got = model(images), folded(images)
    assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
    assert torch.equal(got.topk(5).indices, expected.topk(5).indices)


def test_torchvision_resnet_folds_including_its_downsample_branches() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    for module in model.modules():  # statistics far from the identity, so folding matters
        if isinstance(module, nn.BatchNorm2d):
            assert module.running_mean is not None
            assert module.running_var is not None
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    model.eval()
    folded, count = fold_batchnorm(model, probe(2, 3, 64, 64))
    assert count == 20
    assert batchnorms(folded) == 0
    with torch.inference_mode():
        x = probe(4, 3, 64, 64) * 2
        expected, got = model(x), folded(x)
    assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


class ConvThenNorm(nn.Module):
    """A conv declared right before a BatchNorm of the same width: a candidate pair."""

    def __init__(self, wiring: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.wiring = wiring
        assert self.bn.running_mean is not None
        assert self.bn.running_var is not None
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wiring == "residual":  # the conv's output is also read past the BatchNorm
            y = self.conv(x)
            return self.bn(y) + y
        if self.wiring == "norm_first":  # the BatchNorm reads the input, not the conv
            return self.conv(self.bn(x))
        return self.bn(self.conv(x))


def test_a_plain_conv_then_batchnorm_is_folded() -> None:
    model = ConvThenNorm("plain").eval()
    folded, count = fold_batchnorm(model, probe(2, 4, 8, 8))
    assert count == 1
    assert isinstance(folded.bn, nn.Identity)


def test_conv_output_read_past_the_batchnorm_is_not_folded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = ConvThenNorm("residual").eval()
    with caplog.at_level(logging.WARNING, logger="evalserve.optimize"):
        folded, count = fold_batchnorm(model, probe(2, 4, 8, 8))
    assert count == 0
    assert folded is model
    assert "not folded" in caplog.text
    assert isinstance(model.bn, nn.BatchNorm2d)


def test_batchnorm_that_does_not_read_the_conv_is_not_folded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = ConvThenNorm("norm_first").eval()
    with caplog.at_level(logging.WARNING, logger="evalserve.optimize"):
        folded, count = fold_batchnorm(model, probe(2, 4, 8, 8))
    assert count == 0
    assert folded is model
    assert caplog.text == ""  # refused by the probe's data flow, before any rewrite was tried


def test_unknown_batchnorm_subclass_is_left_alone() -> None:
    class ScaledNorm(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    model = ConvThenNorm("plain")
    model.bn = ScaledNorm(4)
    folded, count = fold_batchnorm(model.eval(), probe(2, 4, 8, 8))
    assert count == 0
    assert folded is model


def test_a_model_in_train_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(ConvThenNorm("plain").train(), probe(2, 4, 8, 8))


@pytest.mark.parametrize(
    ("largest", "buckets"),
    [(1, (1,)), (2, (1, 2)), (12, (1, 2, 4, 8, 12)), (16, (1, 2, 4, 8, 16))],
)
def test_compile_buckets_are_powers_of_two_and_the_largest_batch(
    largest: int, buckets: tuple[int, ...]
) -> None:
    assert compile_buckets(largest) == buckets


def plan_cost(plan: tuple[int, ...], costs: dict[int, float]) -> float:
    return sum(costs[size] for size in plan)


@pytest.mark.parametrize(
    ("costs", "nine"),
    [
        # CPU-like (measured shape): a pass costs about its batch size.
        ({1: 20.0, 2: 32.0, 4: 56.0, 8: 104.0, 16: 198.0}, (8, 1)),
        # GPU-like: a pass of 16 costs little more than a pass of 1.
        ({1: 5.0, 2: 5.1, 4: 5.2, 8: 5.5, 16: 6.0}, (16,)),
    ],
)
def test_batch_plans_cover_each_size_at_the_least_cost(
    costs: dict[int, float], nine: tuple[int, ...]
) -> None:
    plans = batch_plans(costs, 16)
    assert sorted(plans) == list(range(1, 17))
    assert plans[9] == nine
    for n, plan in plans.items():
        assert sum(plan) >= n
        assert set(plan) <= set(costs)
        # No cheaper single padded pass, and no cheaper split into two plans.
        assert plan_cost(plan, costs) <= min(c for size, c in costs.items() if size >= n)
        for first in range(1, n):
            split = plans[first] + plans[n - first]
            assert plan_cost(plan, costs) <= plan_cost(split, costs) + 1e-9


class Recording(nn.Module):
    """A small eval-mode CNN that records the batch size of every pass."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(8, 5)
        self.sizes: list[int] = []

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.sizes.append(batch.shape[0])
        logits: torch.Tensor = self.head(self.features(batch).flatten(1))
        return logits


# Measured shape on a 2-core CPU (EfficientNet-Lite0, eager): per image, 4 is cheapest.
CACHE_BOUND = {1: 15.0, 2: 22.0, 4: 38.0, 8: 106.0, 16: 252.0}


@pytest.mark.parametrize(
    ("costs", "n", "passes"),
    [
        (CACHE_BOUND, 16, [4, 4, 4, 4]),
        (CACHE_BOUND, 7, [4, 2, 1]),
        (CACHE_BOUND, 3, [2, 1]),
        # GPU-like: one pass of the whole batch.
        ({1: 5.0, 2: 5.1, 4: 5.2, 8: 5.5, 16: 6.0}, 16, [16]),
        # A 4 planned for 3 images runs the 3 as they are: nothing is padded.
        ({1: 50.0, 2: 50.0, 4: 10.0, 8: 100.0, 16: 200.0}, 7, [4, 3]),
    ],
)
def test_split_batches_run_each_batch_as_its_plan_with_the_same_logits(
    costs: dict[int, float], n: int, passes: list[int]
) -> None:
    module = Recording().eval()
    split = SplitBatches(module)
    batch = probe(n, 3, 12, 12)
    with torch.inference_mode():
        whole = module(batch)
        split.plan(costs, 16)
        module.sizes.clear()
        parts = split(batch)
    assert module.sizes == passes
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)


def test_split_batches_run_whole_before_planning_and_beyond_the_plans() -> None:
    module = Recording().eval()
    split = SplitBatches(module)
    with torch.inference_mode():
        split(probe(16, 3, 12, 12))
        split.plan(CACHE_BOUND, 8)
        split(probe(12, 3, 12, 12))  # larger than any planned batch
    assert module.sizes == [16, 12]
