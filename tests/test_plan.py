"""RoundingPlan: save/load without pickle, apply/snap, and the snap round-trip through each real backend."""

from __future__ import annotations

import pytest
import torch

from efrap_plugin import (
    EFRAPConfig,
    ModelError,
    PlanMismatchError,
    QuantScheme,
    RoundingPlan,
    defend,
    prepare_model,
    quantizable_layers,
)
from efrap_plugin.redteam import DigitsCNN

FAST = EFRAPConfig(iters=150, calib_size=256)


@pytest.fixture(scope="module")
def plans(clean_cnn, digits):
    schemes = {
        "onnxruntime-8": QuantScheme.onnxruntime(8),
        "onnxruntime-4": QuantScheme.onnxruntime(4),
        "torchao-x86-8": QuantScheme.torchao_x86(8),
        "brevitas-pc": QuantScheme.brevitas(8, per_channel=True),
        "brevitas-pt": QuantScheme.brevitas(8, per_channel=False),
        "reference-4": QuantScheme.reference(4),
    }
    return {k: defend(clean_cnn, digits.train.x, s, FAST, progress=False) for k, s in schemes.items()}


def test_save_load_round_trip(plans, tmp_path):
    plan = plans["torchao-x86-8"]
    path = plan.save(tmp_path / "plan.safetensors")
    loaded = RoundingPlan.load(path)
    assert loaded.scheme == plan.scheme and list(loaded.layers) == list(plan.layers)
    for name, lp in plan.layers.items():
        assert torch.equal(loaded[name].integers, lp.integers) and torch.equal(loaded[name].scale, lp.scale)
        assert loaded[name].fingerprint == lp.fingerprint
    assert loaded.meta.config["iters"] == 150
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary name was renamed away


def test_load_rejects_other_files(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match=r"is not a readable safetensors file"):
        RoundingPlan.load(tmp_path / "x.safetensors")
    with pytest.raises(ModelError, match=r"does not exist"):
        RoundingPlan.load(tmp_path / "missing.safetensors")


def test_plan_for_another_model_is_refused(plans):
    torch.manual_seed(3)
    other = DigitsCNN(width=16).eval()
    with pytest.raises(PlanMismatchError, match=r"weights differ from the ones the plan was made from"):
        plans["onnxruntime-8"].apply(other)
    from efrap_plugin.redteam import resnet8

    with pytest.raises(PlanMismatchError, match=r"layers \['classifier', 'features.0.0'.* are not in ResNet"):
        plans["onnxruntime-8"].apply(resnet8(in_channels=1))


def test_apply_puts_the_plan_on_the_grid(plans, clean_cnn):
    plan = plans["reference-4"]
    applied = plan.apply(clean_cnn)
    for name, module in quantizable_layers(applied):
        lp = plan[name]
        assert torch.equal(module.weight.detach(), lp.dequantized(plan.scheme).reshape(module.weight.shape))


def _snapped_weights(plan, model):
    return dict(quantizable_layers(plan.snap(model)))


def test_snap_round_trip_torchao_observer_and_kernel(plans, clean_cnn):
    from torchao.quantization.pt2e.observer import PerChannelMinMaxObserver

    plan = plans["torchao-x86-8"]
    for name, module in _snapped_weights(plan, clean_cnn).items():
        obs = PerChannelMinMaxObserver(
            ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-128, quant_max=127
        )
        w = module.weight.detach()
        obs(w)
        scale, zp = obs.calculate_qparams()
        ints = torch.quantize_per_channel(w, scale, zp, 0, torch.qint8).int_repr().to(torch.int32)
        assert torch.equal(scale, plan[name].scale)
        assert torch.equal(ints, plan[name].integers), name


@pytest.mark.parametrize("key", ["brevitas-pc", "brevitas-pt"])
def test_snap_round_trip_brevitas(plans, clean_cnn, key):
    import brevitas.nn as qnn
    from brevitas.quant import Int8WeightPerChannelFloat, Int8WeightPerTensorFloat

    plan = plans[key]
    quant = Int8WeightPerChannelFloat if plan.scheme.per_channel else Int8WeightPerTensorFloat
    for name, module in _snapped_weights(plan, clean_cnn).items():
        w = module.weight.detach()
        if w.dim() == 4:
            layer = qnn.QuantConv2d(w.shape[1], w.shape[0], w.shape[2], bias=False, weight_quant=quant)
        else:
            layer = qnn.QuantLinear(w.shape[1], w.shape[0], bias=False, weight_quant=quant)
        with torch.no_grad():
            layer.weight.copy_(w)
        qt = layer.quant_weight()
        assert torch.equal(qt.int().to(torch.int32), plan[name].integers), name


@pytest.mark.parametrize("key", ["onnxruntime-8", "onnxruntime-4"])
def test_snap_round_trip_onnxruntime_quantize_static(plans, clean_cnn, digits, tmp_path, key):
    """Snapped weights, exported and quantized by stock quantize_static, hold exactly the plan's integers."""
    from efrap_onnx import export_defended

    plan = plans[key]
    keyed, report = export_defended(clean_cnn, plan, digits.train.x[:256], tmp_path / "defended.onnx")
    assert report.integers_ok and report.matching == len(plan.layers) == 4
    assert sum(lp.flipped_share > 0 for lp in plan.layers.values()) >= 2  # the plan is not just nearest
    if plan.scheme.bits == 8:
        assert report.runs_int_kernels and report.int_kernels == {"QLinearConv": 3, "QGemm": 1}


def _upsampler() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(128, 10),
    ).eval()


def test_a_conv_transpose_is_learned_on_onnxruntimes_grid_and_exported(digits, tmp_path):
    """onnxruntime quantizes a ConvTranspose per channel along its axis 1: the torch path learns it there
    (output channels first), the snapped export holds its integers, and apply / snap agree."""
    from efrap_onnx import export_defended

    model, calib = _upsampler(), digits.train.x[:128]
    plan = defend(model, calib, "onnxruntime", EFRAPConfig(iters=100, calib_size=128), progress=False)
    assert list(plan.layers) == ["0", "2", "4"] and plan.meta.skipped == {}
    assert tuple(plan["2"].integers.shape) == (2, 4, 3, 3) and plan["2"].flipped_share > 0
    keyed, report = export_defended(model, plan, calib, tmp_path / "d.onnx")
    assert report.integers_ok and report.matching == 3
    assert keyed.meta.layout["2.weight"]["transpose"] is True
    x = digits.test.x[:64]
    with torch.no_grad():
        assert torch.equal(plan.apply(model)(x), plan.snap(model)(x))


def test_an_export_finds_a_weight_with_a_dimension_of_one(digits, tmp_path):
    """A one-output head (8 -> 1) and a one-channel stem: their bytes read the same in either layout, and
    each is matched by the layout its reader gives it (the head was missed: indexed as its transpose)."""
    from efrap_onnx import export_defended

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(144, 8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 1),
    ).eval()
    calib = digits.train.x[:128]
    plan = defend(model, calib, "onnxruntime", EFRAPConfig(iters=20, calib_size=128), progress=False)
    keyed, report = export_defended(model, plan, calib, tmp_path / "d.onnx")
    assert report.integers_ok and report.matching == 3 and "5.weight" in keyed.layers


def test_an_export_that_fails_its_verification_writes_nothing(digits, tmp_path, caplog):
    """onnxruntime quantizes a Conv3d the torch path leaves unlearned (and says so): export_defended's
    proof fails, says why (naming the unlearned layer) and leaves no model at the output path."""
    from efrap_onnx import export_defended

    class WithConv3d(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.volume = torch.nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
            self.head = torch.nn.Linear(2 * 4 * 64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.volume(torch.relu(self.conv(x)).unsqueeze(1))).flatten(1))

    torch.manual_seed(0)
    model, calib = WithConv3d().eval(), digits.train.x[:128]
    with caplog.at_level("WARNING", logger="efrap_plugin"):
        plan = defend(model, calib, "onnxruntime", EFRAPConfig(iters=20, calib_size=128), progress=False)
    assert list(plan.meta.skipped) == ["volume"] and "volume: Conv3d" in caplog.text
    with pytest.raises(
        PlanMismatchError,
        match=r"nothing was written .*the plan lacks \['volume.weight_quantized'\].*"
        r"the plan left \['volume'\] unlearned \(Conv3d",
    ):
        export_defended(model, plan, calib, tmp_path / "d.onnx")
    assert list(tmp_path.iterdir()) == []


def test_prepare_model_folds_batchnorm_only_when_the_backend_does(clean_cnn):
    folded = prepare_model(clean_cnn, QuantScheme.onnxruntime())
    kept = prepare_model(clean_cnn, QuantScheme.reference())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in kept.modules())
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(folded(x), clean_cnn.eval()(x), atol=1e-5)
