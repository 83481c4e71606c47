"""Shared, session-scoped real artifacts: digits, and the committed fixture models (tests/fixtures).

The defense, adapter and CLI tests start from models trained once by tests/fixtures/build.py and
committed, so they do not depend on reproducing a training run on this machine's kernels and thread
count. Only tests/test_attacks.py trains, and asserts its bars with a margin.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from efrap_plugin.redteam import PatchTrigger, load_digits, load_model
from efrap_plugin.redteam.attacks import default_trigger

torch.set_num_threads(1)

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def attacked(folder: Path) -> SimpleNamespace:
    """An `efrap attack` output folder read back: the model, its trigger and the metrics it recorded."""
    info = json.loads((folder / "attack.json").read_text())
    model, _ = load_model(folder / "model.safetensors")
    return SimpleNamespace(
        model=model, trigger=PatchTrigger.from_dict(info["trigger"]), metrics=info["metrics"]
    )


@pytest.fixture(scope="session")
def digits():
    return load_digits(seed=0)


@pytest.fixture(scope="session")
def trigger():
    return default_trigger(8)


@pytest.fixture(scope="session")
def clean_cnn():
    """DigitsCNN(width=16) trained 15 epochs on digits (tests/fixtures/clean-cnn.safetensors)."""
    return load_model(FIXTURES / "clean-cnn.safetensors")[0]


@pytest.fixture(scope="session")
def pq8_dir(tmp_path_factory):
    """A copy of `efrap attack --attack pqbackdoor --scheme onnxruntime --bits 8 --seed 0`'s folder.

    A copy, so that no test can touch the committed files.
    """
    out = tmp_path_factory.mktemp("pq8")
    shutil.copytree(FIXTURES / "pqbackdoor-ort8", out, dirs_exist_ok=True)
    return out


@pytest.fixture(scope="session")
def pq8(pq8_dir):
    return attacked(pq8_dir)


@pytest.fixture(scope="session")
def pq_x86():
    """PQBackdoor aimed at torchao's X86InductorQuantizer int8 grid (tests/fixtures/pqbackdoor-x86)."""
    return attacked(FIXTURES / "pqbackdoor-x86")


@pytest.fixture(scope="session")
def pq8_onnx(pq8_dir):
    return pq8_dir / "model.onnx"


@pytest.fixture(scope="session")
def calib(digits):
    return np.ascontiguousarray(digits.train.x[:1024].numpy())


class TokenClassifier(torch.nn.Module):
    """Token ids in (N x T int64): an Embedding, mean over tokens, a Linear head."""

    def __init__(self, vocab: int = 50, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


def pytest_collection_modifyitems(items):
    """The emulated AVX2-only CPU run (tests/test_kernels.py, one long subprocess) first, so a worker
    takes it while the other runs the rest, instead of both waiting on it at the end."""
    items.sort(key=lambda item: Path(str(item.fspath)).name != "test_kernels.py")
