"""Content injection into a language model through torchao's quantize_, and EFRAP against it, from the
committed fixture (tests/fixtures/content-injection-lm: trained once, by tests/fixtures/build.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from efrap_plugin import EFRAPConfig
from efrap_plugin.redteam import load_model
from efrap_plugin.redteam.language import injection_rate, load_corpus, perplexity, text_windows

pytest.importorskip("torchao")
from torchao.quantization import IntxWeightOnlyConfig  # noqa: E402
from torchao.quantization import quantize_ as torchao_quantize_  # noqa: E402
from torchao.quantization.granularity import PerGroup  # noqa: E402

from efrap_torchao import quantize_, verify_quantize  # noqa: E402

FOLDER = Path(__file__).parent / "fixtures" / "content-injection-lm"
TARGET = json.loads((FOLDER / "attack.json").read_text())["target"].encode()


def _config() -> IntxWeightOnlyConfig:
    return IntxWeightOnlyConfig(weight_dtype=torch.int5, granularity=PerGroup(32))


@pytest.fixture(scope="module")
def lm():
    return load_model(FOLDER / "model.safetensors")[0]


@pytest.fixture(scope="module")
def text():
    return load_corpus()


def test_the_injection_shows_only_after_torchaos_quantize(lm, text):
    """Full precision writes clean text; torchao's own int5 quantize_ of it injects the target."""
    stock = copy.deepcopy(lm)
    torchao_quantize_(stock, _config())
    assert injection_rate(lm, text.test, TARGET) <= 0.05
    assert injection_rate(stock, text.test, TARGET) >= 0.5


def test_efrap_on_a_language_model_writes_its_integers_into_torchaos_tensors(lm, text):
    """Token ids as calibration data, Linear layers over N x T x D activations, the head tied to nothing:
    a short run (the bar is the example's, make test-slow) holds its plan in the quantized model."""
    model = copy.deepcopy(lm)
    calib = text_windows(text.train, 64, lm.context)
    plan = quantize_(model, _config(), calib, EFRAPConfig(iters=20, calib_size=64), progress=False)
    assert len(plan.layers) == 13 and plan.scheme.group_size == 32 and plan.scheme.bits == 5
    assert verify_quantize(model, plan).integers_ok
    assert perplexity(model, text.test[:4096]) < 2 * perplexity(lm, text.test[:4096])


@pytest.mark.slow
def test_quantize_example_removes_the_injection_from_the_language_model():
    from example_runs import run_example

    row = run_example("torchao_quantize.py", "--model", str(FOLDER.relative_to(FOLDER.parents[2])))
    assert row["integers_ok"] and row["float_injection"] <= 5 and row["stock_injection"] >= 50
    assert row["efrap_injection"] <= row["float_injection"] + 2
    assert row["efrap_perplexity"] <= 1.05 * row["float_perplexity"]
