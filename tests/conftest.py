"""Shared, session-scoped real artifacts: digits, a trained CNN, a PQBackdoor model and its ONNX files."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from efrap_plugin import DigitsCNN, PatchTrigger, load_digits, load_model, train
from efrap_plugin.attacks import default_trigger

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
def pq8_dir(tmp_path_factory):
    """`efrap attack` run once: PQBackdoor aimed at onnxruntime int8 on digits (the demo's attack)."""
    from efrap_cli import main

    out = tmp_path_factory.mktemp("pq8")
    args = [
        "attack",
        "--attack",
        "pqbackdoor",
        "--dataset",
        "digits",
        "--scheme",
        "onnxruntime",
        "--bits",
        "8",
    ]
    assert main([*args, "--seed", "0", "--out", str(out), "--quiet", "--json"]) == 0
    return out


@pytest.fixture(scope="session")
def pq8(pq8_dir):
    """The attacked model read back from the CLI's files, with its trigger and measured metrics."""
    info = json.loads((pq8_dir / "attack.json").read_text())
    model, _ = load_model(pq8_dir / "model.safetensors")
    return SimpleNamespace(
        model=model, trigger=PatchTrigger.from_dict(info["trigger"]), metrics=info["metrics"]
    )


@pytest.fixture(scope="session")
def pq8_onnx(pq8_dir):
    return pq8_dir / "model.onnx"


@pytest.fixture(scope="session")
def calib(digits):
    return np.ascontiguousarray(digits.train.x[:1024].numpy())
