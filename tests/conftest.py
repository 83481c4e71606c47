"""Shared, session-scoped real artifacts: digits, a trained CNN, a PQBackdoor model and its ONNX files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from efrap_plugin import DigitsCNN, load_digits, train
from efrap_plugin.attacks import default_trigger, run_attack

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    return load_digits(seed=0)


@pytest.fixture(scope="session")
def trigger():
    return default_trigger(8)


@pytest.fixture(scope="session")
def clean_cnn(digits):
    torch.manual_seed(0)
    model = DigitsCNN(width=16)
    return train(model, digits.train, epochs=15, lr=3e-3, batch_size=64, progress=False)


@pytest.fixture(scope="session")
def pq8(digits):
    """PQBackdoor aimed at onnxruntime int8 on digits (the demo's attack), with its metrics."""
    result, splits, arch = run_attack("pqbackdoor", "digits", "onnxruntime", 8, seed=0, progress=False)
    return result


@pytest.fixture(scope="session")
def pq8_onnx(pq8, digits, tmp_path_factory):
    from efrap_onnx import export_float_onnx

    path = tmp_path_factory.mktemp("pq8") / "model.onnx"
    return export_float_onnx(pq8.model, digits.train.x[:2], path)


@pytest.fixture(scope="session")
def calib(digits):
    return np.ascontiguousarray(digits.train.x[:1024].numpy())
