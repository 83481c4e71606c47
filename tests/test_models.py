"""The zoo trains and runs: the digits CNN reaches 95% in seconds; ResNets handle 1 or 3 channels."""

from __future__ import annotations

import time

import pytest
import torch

from efrap_plugin import EFRAPError
from efrap_plugin.redteam import build_model, clean_acc, resnet8, resnet20, train


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
    with pytest.raises(
        EFRAPError,
        match=r"model: expected one of \['byte-gpt', 'digits-cnn', 'digits-mlp', 'digits-tokens', 'mobilenetv2', 'resnet18', "
        r"'resnet20', 'resnet8', 'sequence-cnn'\]",
    ):
        build_model("vgg16")


@pytest.mark.parametrize(
    "name, options, shape, parameters",
    [
        ("resnet8", {"in_channels": 3}, (3, 32, 32), 78_042),  # unchanged by the stages tuple
        ("resnet18", {"in_channels": 3}, (3, 32, 32), 11_173_962),
        ("mobilenetv2", {"in_channels": 3}, (3, 32, 32), 2_236_682),
        ("sequence-cnn", {"in_channels": 8}, (8, 64), 20_170),
    ],
)
def test_zoo_models_build_and_run(name, options, shape, parameters):
    model = build_model(name, **options).eval()
    assert sum(p.numel() for p in model.parameters()) == parameters
    with torch.no_grad():
        assert model(torch.rand(2, *shape)).shape == (2, 10)


def test_a_conv1d_sequence_model_goes_through_the_onnx_drop_in(tmp_path):
    import numpy as np

    from efrap_onnx import ListDataReader, export_float_onnx, quantize_static, verify
    from efrap_plugin import EFRAPConfig

    torch.manual_seed(0)
    model = build_model("sequence-cnn", in_channels=8).eval()
    x = torch.rand(128, 8, 64)
    src = export_float_onnx(model, x[:2], tmp_path / "seq.onnx")
    reader = ListDataReader.from_array("input", np.ascontiguousarray(x.numpy()))
    plan = quantize_static(
        src, tmp_path / "q.onnx", reader, per_channel=True, config=EFRAPConfig(iters=20), progress=False
    )
    assert len(plan.layers) == 4 and verify(tmp_path / "q.onnx", plan).integers_ok
