"""The digits model, trained in the repository: deterministic training, and why eval mode matters.

The eager network is rebuilt from train.py's class with the weights of the committed program, so
train mode can be shown on the very weights that are served.
"""

from __future__ import annotations

import copy

import pytest
import torch
from support import MODELS, digits_trainer
from torch import nn

train_py = digits_trainer()


@pytest.fixture(scope="module")
def net() -> nn.Module:
    program = torch.export.load(str(MODELS / "digits" / "model.pt2"))
    model = train_py.DigitsNet()
    model.load_state_dict(program.state_dict, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    split = train_py.load_split()
    mean, std = split.train_x.mean() / 255.0, split.train_x.std() / 255.0
    return train_py.to_tensor(split.test_x[:16], float(mean), float(std))


def test_training_is_deterministic() -> None:
    first = train_py.train(epochs=2, log=False)
    second = train_py.train(epochs=2, log=False)
    assert first.test_accuracy == second.test_accuracy
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_the_network_has_dropout_and_batchnorm(net: nn.Module) -> None:
    kinds = {type(m) for m in net.modules()}
    assert nn.Dropout in kinds
    assert nn.BatchNorm2d in kinds


def test_committed_weights_are_small() -> None:
    assert (MODELS / "digits" / "model.pt2").stat().st_size < 1_000_000


def test_train_mode_gives_different_outputs_for_the_same_image(
    net: nn.Module, test_images: torch.Tensor
) -> None:
    image = test_images[:4]
    training = copy.deepcopy(net).train()
    with torch.no_grad():
        first, second = training(image), training(image)
    assert not torch.allclose(first, second), "dropout should make two calls differ"
    with torch.inference_mode():
        assert torch.equal(net(image), net(image))


def test_train_mode_makes_an_image_depend_on_its_batch(
    net: nn.Module, test_images: torch.Tensor
) -> None:
    training = copy.deepcopy(net).train()
    for module in training.modules():  # isolate BatchNorm: switch dropout off
        if isinstance(module, nn.Dropout):
            module.eval()
    image = test_images[:1]
    others = test_images[1:8]
    with torch.no_grad():
        alone = training(image)[0]
        in_batch = training(torch.cat([image, others]))[0]
    assert (alone - in_batch).abs().max() > 1e-3, "batch statistics should leak between images"
    with torch.inference_mode():
        assert torch.allclose(net(image)[0], net(torch.cat([image, others]))[0], atol=1e-5)
