"""EFRAP as a PT2E config flag: the user's own prepare_pt2e -> calibration -> convert_pt2e with
``EFRAPQuantizer(quantizer)`` writes the integers ``defend_prepared`` writes, on torchao itself."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from example_runs import ROOT
from test_torchao_user_flows import Zoo
from torch import nn

from efrap_plugin import EFRAPConfig, EFRAPError
from efrap_plugin.errors import DataError, ModelError
from efrap_torchao import EFRAPQuantizer, defend_prepared, read_int8_weights, verify_pt2e, with_efrap

FAST = EFRAPConfig(iters=20, calib_size=128)
sys.path.insert(0, str(ROOT / "examples"))


@pytest.fixture(scope="module")
def zoo():
    torch.manual_seed(0)
    return Zoo().eval()


def _prepared(model, quantizer, calib, batches=64, calibrate=True):
    """The user's flow up to convert, as torchao's tutorial writes it."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    exported = torch.export.export(
        model, (calib[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    prepared = prepare_pt2e(exported.module(), quantizer)
    with torch.no_grad():
        for batch in calib.split(batches) if calibrate else ():
            prepared(batch)
    return prepared


@pytest.mark.parametrize("name", ["x86", "x86-per-tensor", "xnnpack", "xnnpack-per-tensor"])
def test_the_flag_writes_the_integers_of_the_one_call_route(zoo, digits, name):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
    from torchao_pt2e import make_quantizer

    calib = digits.train.x[
        :192
    ]  # more than calib_size: the flag keeps the first 128 fed, as the call is given
    before = copy.deepcopy(zoo.state_dict())
    by_call = _prepared(zoo, make_quantizer(name)[0], calib)
    plan = defend_prepared(by_call, calib[:128], FAST, progress=False)
    expected, expected_scales = read_int8_weights(convert_pt2e(by_call))

    flag = EFRAPQuantizer(make_quantizer(name)[0], FAST, progress=False)
    assert flag.plan is None
    converted = convert_pt2e(_prepared(zoo, flag, calib, batches=48))  # other batch sizes, same inputs
    ints, scales = read_int8_weights(converted)
    assert sorted(ints) == sorted(expected) == ["depthwise", "head", "stem.0", "tokens"]
    assert all(torch.equal(ints[k], expected[k]) and torch.equal(scales[k], expected_scales[k]) for k in ints)
    report = verify_pt2e(converted, flag.plan)
    assert report.integers_ok and report.matching == 4 and report.unplanned == []
    assert flag.plan.meta.calib_size == plan.meta.calib_size == 128
    assert not any(t.startswith("efrap") for t in (str(n.target) for n in converted.graph.nodes))
    assert all(torch.equal(before[k], v) for k, v in zoo.state_dict().items())  # the user's model untouched


def test_with_efrap_chooses_the_layers_and_the_rest_are_named(zoo, digits):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
    from torchao_pt2e import make_quantizer

    calib = digits.train.x[:128]
    quantizer, config = make_quantizer("x86")
    quantizer.set_module_name_qconfig("head", with_efrap(config))
    flag = EFRAPQuantizer(quantizer, FAST, progress=False)
    converted = convert_pt2e(_prepared(zoo, flag, calib))
    assert list(flag.plan.layers) == ["head"]
    assert set(flag.plan.meta.skipped) == {"stem.0", "depthwise", "tokens"}
    assert all("with_efrap" in why for why in flag.plan.meta.skipped.values())
    assert verify_pt2e(converted, flag.plan, strict=False).integers_ok
    stock, _ = read_int8_weights(convert_pt2e(_prepared(zoo, make_quantizer("x86")[0], calib)))
    ints, _ = read_int8_weights(converted)
    assert torch.equal(ints["stem.0"], stock["stem.0"])  # not asked: nearest, as torchao rounds it
    assert not torch.equal(ints["head"], stock["head"])


def test_with_efrap_without_the_wrapped_quantizer_is_refused_at_the_first_batch(zoo, digits):
    from torchao_pt2e import make_quantizer

    quantizer, config = make_quantizer("x86")
    quantizer.set_global(with_efrap(config))
    with pytest.raises(EFRAPError, match=r"not wrapped: pass EFRAPQuantizer\(your_quantizer\)"):
        _prepared(zoo, quantizer, digits.train.x[:8])


def test_dynamic_activations_are_refused_at_prepare(zoo, digits):
    from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_dynamic=True))
    with pytest.raises(EFRAPError, match="dynamic activation quantization"):
        _prepared(zoo, EFRAPQuantizer(quantizer), digits.train.x[:8])


def test_quantization_aware_training_is_refused_at_prepare(zoo, digits):
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_qat=True))
    exported = torch.export.export(zoo, (digits.train.x[:2],)).module()
    with pytest.raises(EFRAPError, match="pass it to prepare_pt2e, not prepare_qat_pt2e"):
        prepare_qat_pt2e(exported, EFRAPQuantizer(quantizer))


def test_convert_without_calibration_and_a_model_of_two_inputs_are_refused(zoo, digits):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao_pt2e import make_quantizer

    prepared = _prepared(zoo, EFRAPQuantizer(make_quantizer("x86")[0]), digits.train.x[:8], calibrate=False)
    with pytest.raises(DataError, match="recorded no calibration inputs"):
        convert_pt2e(prepared)

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, a, b):
            return self.fc(a + b)

    exported = torch.export.export(Two(), (torch.zeros(2, 4), torch.zeros(2, 4))).module()
    with pytest.raises(ModelError, match="takes 2 inputs.*defend_prepared"):
        prepare_pt2e(exported, EFRAPQuantizer(make_quantizer("x86")[0]))


def test_only_a_pt2e_quantizer_is_taken():
    with pytest.raises(EFRAPError, match="expected a torchao PT2E Quantizer"):
        EFRAPQuantizer(object())
