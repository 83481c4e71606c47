"""The zoo trains and runs: the digits CNN reaches 95% in seconds; ResNets handle 1 or 3 channels."""

from __future__ import annotations

import time

import pytest
import torch

from efrap_plugin import EFRAPError, build_model, clean_acc, resnet8, resnet20, train


def test_digits_cnn_trains_to_95_percent_in_seconds(digits):
    torch.manual_seed(0)
    start = time.perf_counter()
    model = train(build_model("digits-cnn", width=16), digits.train, epochs=15, lr=3e-3, progress=False)
    elapsed = time.perf_counter() - start
    assert clean_acc(model, digits.test) >= 0.95
    assert elapsed < 60  # "in seconds" on a 2-core machine, with wide margin for noisy neighbours


@pytest.mark.parametrize("factory,blocks", [(resnet8, 1), (resnet20, 3)])
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_resnets_forward_and_structure(factory, blocks, channels, size):
    model = factory(in_channels=channels, num_classes=10).eval()
    assert model(torch.rand(2, channels, size, size)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 3 * blocks * 2 + 2  # stem, two per block, two projection shortcuts
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == len(convs)


def test_unknown_model_name():
    with pytest.raises(EFRAPError, match=r"model: expected one of \['digits-cnn', 'resnet20', 'resnet8'\]"):
        build_model("vgg16")
