"""The verdict can be trusted: verify fails a tampered artifact, and bad values are refused at the
boundary with the library's error instead of reaching a plan.

Each tamper starts from one defended QDQ file and changes what decides a weight's dequantized value
(zero point, the scale a node actually reads, the channel axis); each bad value is one a careless or
hostile caller passes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from efrap_onnx import ListDataReader, quantize_static, verify
from efrap_plugin import EFRAPConfig, EFRAPError, ModelError, PlanMismatchError, RoundingPlan

FAST = EFRAPConfig(iters=40, calib_size=256, budget=None)


@pytest.fixture(scope="module")
def defended(pq8_onnx, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "d.onnx"
    reader = ListDataReader.from_array("input", calib[:256])
    plan = quantize_static(pq8_onnx, out, reader, per_channel=True, config=FAST, progress=False)
    assert verify(out, plan).integers_ok
    return out, plan


def _tampered(path, tmp_path, change) -> str:
    model = onnx.load(str(path))
    change(model)
    out = tmp_path / "tampered.onnx"
    onnx.save(model, str(out))
    return str(out)


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _weight_dq(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")
    )


def test_verify_fails_a_moved_weight_zero_point(defended, tmp_path):
    path, plan = defended

    def move(model):
        zp = _init(model, _weight_dq(model).input[2])
        zp.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(zp) + np.int8(3), zp.name))

    report = verify(_tampered(path, tmp_path, move), plan, strict=False)
    assert not report.integers_ok and len(report.zero_point_mismatches) == 1
    with pytest.raises(PlanMismatchError, match="zero point mismatches"):
        verify(_tampered(path, tmp_path, move), plan)


def test_verify_follows_the_scale_the_node_reads_not_the_name_in_the_plan(defended, tmp_path):
    """The DequantizeLinear rewired to a new scale initializer (x4): the plan's named scale is untouched."""
    path, plan = defended

    def rewire(model):
        dq = _weight_dq(model)
        scale = numpy_helper.to_array(_init(model, dq.input[1])) * np.float32(4)
        model.graph.initializer.append(numpy_helper.from_array(scale, "rewired_scale"))
        dq.input[1] = "rewired_scale"

    report = verify(_tampered(path, tmp_path, rewire), plan, strict=False)
    assert not report.integers_ok and len(report.scale_mismatches) == 1


def test_verify_fails_scales_along_another_axis(defended, tmp_path):
    path, plan = defended

    def turn(model):
        dq = _weight_dq(model)
        for a in dq.attribute:
            if a.name == "axis":
                a.i = 1
        if not any(a.name == "axis" for a in dq.attribute):
            dq.attribute.append(onnx.helper.make_attribute("axis", 1))

    report = verify(_tampered(path, tmp_path, turn), plan, strict=False)
    assert not report.integers_ok and any("axis 1" in v for v in report.grid_mismatches.values())


def test_verify_checks_each_quantized_bias_against_the_float_model(defended, pq8_onnx, tmp_path):
    """A bias moved by 1e6 (accuracy 10% in the report that found it) fails; without the float model the
    biases are named as unchecked, never silently passed."""
    path, plan = defended

    def move(model):
        bias = next(t for t in model.graph.initializer if t.name.endswith("bias_quantized"))
        values = numpy_helper.to_array(bias).copy()
        values[0] += 1_000_000
        bias.CopyFrom(numpy_helper.from_array(values, bias.name))

    tampered = _tampered(path, tmp_path, move)
    assert verify(path, plan, float_model=pq8_onnx).integers_ok
    report = verify(tampered, plan, strict=False, float_model=pq8_onnx)
    assert not report.integers_ok and len(report.bias_mismatches) == 1
    blind = verify(tampered, plan, strict=False)
    assert blind.integers_ok and len(blind.unchecked) == 4  # one bias per layer, named


def test_an_untouched_file_still_verifies(defended):
    path, plan = defended
    report = verify(path, plan)
    assert report.integers_ok and not report.zero_point_mismatches and report.matching == len(plan.layers)


@pytest.mark.parametrize(
    "field, value",
    [
        ("flip_weight", math.nan),
        ("lr", math.inf),
        ("beta", math.inf),
        ("round_weight", -math.inf),
        ("seed", "7"),
        ("settle", math.nan),
        ("budget", math.nan),
    ],
)
def test_config_refuses_values_that_are_no_finite_number(field, value):
    with pytest.raises(EFRAPError, match=f"EFRAPConfig.{field}"):
        EFRAPConfig(**{field: value})


def test_config_from_json_refuses_a_seed_given_as_text():
    with pytest.raises(EFRAPError, match="seed"):
        EFRAPConfig.from_json('{"seed": "7"}')


def test_the_cli_refuses_a_nan_flip_weight(pq8_onnx, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "efrap_cli.main", "defend", str(pq8_onnx), "--calib", "digits",
         "--out", str(tmp_path / "d.onnx"), "--flip-weight", "nan", "--budget", "off", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0 and "flip_weight" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "d.onnx").exists()


def test_a_layer_whose_loss_is_not_finite_stops_the_run_by_name(clean_cnn, digits):
    from efrap_plugin import defend

    huge = digits.train.x[:64] * 1e30  # squares to infinity in float32
    with pytest.raises(EFRAPError, match=r"layer '.*': the objective is not finite"):
        defend(clean_cnn, huge, config=FAST.replace(calib_size=64), progress=False)


def _saved_plan(plan: RoundingPlan, tmp_path, **changes) -> str:
    name = next(iter(plan.layers))
    layers = dict(plan.layers)
    layers[name] = type(layers[name])(**{**layers[name].__dict__, **changes})
    path = tmp_path / "plan.safetensors"
    RoundingPlan(plan.scheme, layers, plan.source, plan.meta).save(path)
    return str(path)


@pytest.mark.parametrize(
    "what, change, message",
    [
        ("off the grid", lambda lp: {"integers": lp.integers.clone().fill_(1000)}, "off its grid"),
        ("fractional", lambda lp: {"integers": lp.integers.to(torch.float32) + 0.5}, "not whole numbers"),
        ("nan scale", lambda lp: {"scale": torch.full_like(lp.scale, math.nan)}, "finite and positive"),
        ("negative scale", lambda lp: {"scale": -lp.scale}, "finite and positive"),
        ("one scale", lambda lp: {"scale": lp.scale[:1], "zero_point": lp.zero_point[:1]}, "one scale"),
    ],
)
def test_a_plan_with_unusable_values_is_refused_on_load(defended, tmp_path, what, change, message):
    _, plan = defended
    lp = next(iter(plan.layers.values()))
    path = _saved_plan(plan, tmp_path, **change(lp))
    with pytest.raises(ModelError, match=message):
        RoundingPlan.load(path)


def test_a_plan_listing_a_layer_twice_is_refused(defended, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, plan = defended
    path = tmp_path / "plan.safetensors"
    plan.save(path)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    header = json.loads(meta["efrap-plan"])
    header["layers"][1]["name"] = header["layers"][0]["name"]
    save_file(tensors, str(path), metadata={"efrap-plan": json.dumps(header)})
    with pytest.raises(ModelError, match="listed twice"):
        RoundingPlan.load(path)


def test_calibration_batches_are_read_only_as_far_as_needed():
    """An endless generator (or a DataLoader over a large set) is read up to the rows the defense uses."""
    from efrap_plugin import as_calibration

    pulled = []

    def endless():
        while True:
            pulled.append(1)
            yield torch.zeros(16, 1, 8, 8)

    assert tuple(as_calibration(endless(), 40).shape) == (40, 1, 8, 8)
    assert len(pulled) == 3


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ListDataReader.from_arrays({}), "no arrays given"),
        (
            lambda: ListDataReader.from_array("input", np.zeros((4, 1, 8, 8), np.float32), batch_size=0),
            "batch_size",
        ),
    ],
)
def test_list_data_reader_refuses_what_gives_no_batches(make, message):
    with pytest.raises(EFRAPError, match=message):
        make()


class _ArraysReader:
    """A reader that yields bare arrays, not input dicts."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def get_next(self):
        return next(self.batches, None)


@pytest.mark.parametrize(
    "reader, message",
    [
        (_ArraysReader([np.zeros((4, 1, 8, 8), np.float32)]), "returned a ndarray; it must return a dict"),
        (
            ListDataReader([{"input": np.zeros((0, 1, 8, 8), np.float32)}]),
            "a batch holds an array with no rows",
        ),
    ],
)
def test_a_reader_yielding_no_input_dicts_or_no_rows_is_named(pq8_onnx, tmp_path, reader, message):
    with pytest.raises(EFRAPError, match=message):
        quantize_static(pq8_onnx, tmp_path / "d.onnx", reader, progress=False)
    assert not (tmp_path / "d.onnx").exists()


def test_scan_refuses_a_model_whose_batchnorm_folds_into_nan(tmp_path, capsys):
    from efrap_cli import main
    from efrap_plugin.redteam import DigitsCNN, save_model

    model = DigitsCNN(width=8, batchnorm=True)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var[0] = -1.0  # sqrt of a negative variance: NaN weights once folded
    save_model(model, tmp_path / "m.safetensors", {"name": "digits-cnn", "width": 8, "batchnorm": True})
    assert main(["scan", str(tmp_path / "m.safetensors"), "--json"]) != 0
    out = capsys.readouterr()
    assert "holds NaN or Inf values" in out.err and json.loads(out.out)["exit_code"] == 1  # valid JSON


def test_written_onnx_files_carry_no_source_traces(clean_cnn, digits, tmp_path):
    """torch's exporter records Python stack traces (source paths of the exporting machine) per node."""
    from efrap_onnx import export_float_onnx

    path = export_float_onnx(clean_cnn, digits.train.x[:2], tmp_path / "f.onnx")
    keys = {p.key for n in onnx.load(str(path)).graph.node for p in n.metadata_props}
    assert keys and "pkg.torch.onnx.stack_trace" not in keys


def test_defend_prepared_leaves_a_training_models_batchnorm_statistics_as_they_were(digits):
    """An eager model prepared (and calibrated) in train mode: the defense's captures run it in eval mode,
    so the caller's BatchNorm statistics and module modes are what they were."""
    from torch.ao.quantization import QuantStub, get_default_qconfig, prepare

    from efrap_torchao import defend_prepared

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = QuantStub()
            self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8 * 64, 10)
            self.dequant = torch.ao.quantization.DeQuantStub()

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(self.quant(x))))
            return self.dequant(self.fc(x.flatten(1)))

    torch.manual_seed(0)
    model = Net()
    model.qconfig = get_default_qconfig("x86")
    prepared = prepare(model)
    prepared.train()
    with torch.no_grad():
        for batch in digits.train.x[:128].split(64):
            prepared(batch)
    before = {k: v.clone() for k, v in prepared.bn.state_dict().items()}
    defend_prepared(prepared, digits.train.x[:128], FAST.replace(calib_size=128), progress=False)
    after = prepared.bn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in prepared.modules())


@pytest.mark.parametrize("flow", ["pt2e", "fx"])
def test_defend_prepared_refuses_a_model_never_calibrated(pq_x86, digits, flow):
    """Observers that saw no data give scale 1.0 at convert: refused with the fix, before any work."""
    import copy

    from efrap_torchao import defend_prepared

    model = copy.deepcopy(pq_x86.model).eval()
    example = digits.train.x[:2]
    if flow == "pt2e":
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        exported = torch.export.export(model, (example,)).module()
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
    else:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_fx

        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (example,))
    with pytest.raises(ModelError, match="never calibrated"):
        defend_prepared(prepared, digits.train.x[:64], FAST.replace(calib_size=64), progress=False)


def test_defending_a_prepared_model_twice_is_refused(pq_x86, digits):
    import copy

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    from efrap_torchao import defend_prepared

    prepared = prepare_fx(
        copy.deepcopy(pq_x86.model).eval(), get_default_qconfig_mapping("x86"), (digits.train.x[:2],)
    )
    with torch.no_grad():
        prepared(digits.train.x[:64])
    config = FAST.replace(calib_size=64, iters=10)
    defend_prepared(prepared, digits.train.x[:64], config, progress=False)
    with pytest.raises(EFRAPError, match="already snapped its weights"):
        defend_prepared(prepared, digits.train.x[:64], config, progress=False)


def test_verify_eager_reads_a_users_own_quant_wrapper(clean_cnn, digits):
    """A plan learned on the user's QuantWrapper names layers 'module.*': read back with the prefix."""
    import copy

    from torch.ao.quantization import QuantWrapper, convert, get_default_qconfig, prepare

    from efrap_torchao import defend_prepared, verify_eager

    wrapped = QuantWrapper(copy.deepcopy(clean_cnn).eval())
    wrapped.qconfig = get_default_qconfig("x86")
    prepared = prepare(wrapped)
    with torch.no_grad():
        prepared(digits.train.x[:64])
    plan = defend_prepared(
        prepared, digits.train.x[:64], FAST.replace(calib_size=64, iters=10), progress=False
    )
    assert all(name.startswith("module.") for name in plan.layers)
    report = verify_eager(convert(prepared), plan)
    assert report.integers_ok and report.matching == len(plan.layers)


@pytest.mark.parametrize(
    "case, message",
    [
        ("config on meta", "device: 'meta' holds no values"),
        ("calibration on meta", "calibration data: a tensor on the meta device"),
        ("model on meta", "is on the meta device"),
        ("sparse calibration", "pass a dense one"),
        ("float64 model", "is torch.float64; EFRAP learns in float32"),
        ("float16 model", "is torch.float16; EFRAP learns in float32"),
    ],
)
def test_the_core_names_inputs_it_cannot_learn_from(clean_cnn, digits, case, message):
    import copy

    from efrap_plugin import defend

    model, calib, config = copy.deepcopy(clean_cnn), digits.train.x[:64], FAST.replace(calib_size=64, iters=5)
    if case == "config on meta":
        config = config.replace(device="meta")
    elif case == "calibration on meta":
        calib = calib.to("meta")
    elif case == "model on meta":
        model = model.to("meta")
    elif case == "sparse calibration":
        calib = calib.to_sparse()
    else:
        model = model.double() if case == "float64 model" else model.half()
    with pytest.raises(EFRAPError, match=message):
        defend(model, calib, config=config, progress=False)


def test_defend_prepared_names_calibration_that_does_not_fit(pq_x86, digits):
    """torch's refusal is a guard's bare AssertionError; the library names the shape and the fix."""
    import copy

    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from efrap_torchao import defend_prepared

    batch = torch.export.Dim("batch")
    exported = torch.export.export(
        copy.deepcopy(pq_x86.model).eval(), (digits.train.x[:2],), dynamic_shapes=({0: batch},)
    ).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        prepared(digits.train.x[:64])
    with pytest.raises(
        EFRAPError, match=r"inputs of shape \(3, 8, 8\) do not run through the prepared model"
    ):
        defend_prepared(prepared, torch.zeros(64, 3, 8, 8), FAST.replace(calib_size=64), progress=False)


def test_quantize_eager_names_what_torch_ao_refuses(digits):
    from efrap_torchao import quantize_eager

    class Upsampler(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.ConvTranspose2d(1, 4, 3)
            self.head = torch.nn.Linear(4 * 10 * 10, 10)

        def forward(self, x):
            return self.head(torch.relu(self.up(x)).flatten(1))

    with pytest.raises(EFRAPError, match="torch.ao's eager prepare refuses Upsampler"):
        quantize_eager(Upsampler(), digits.train.x[:64])


def test_a_transformer_encoder_pre_processing_cannot_prepare_is_defended_as_it_is(tmp_path, capsys, caplog):
    """torch.onnx.export's encoder layer (opset 17, LayerNormalization, GELU through Erf): onnxruntime's
    quant_pre_process fails on it while its quantize_static quantizes the raw graph; so does `efrap
    defend`, with a notice, and every quantized tensor is accounted for (GELU's scalars are Constant
    nodes onnxruntime quantizes)."""
    import warnings

    from efrap_cli import main

    torch.manual_seed(0)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.TransformerEncoderLayer(
                16, 2, 32, dropout=0.0, batch_first=True, activation="gelu"
            )
            self.head = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.layer(x).mean(1))

    src = tmp_path / "enc.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Encoder().eval(), (torch.randn(2, 6, 16),), str(src), opset_version=17, dynamo=False,
            input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
        )  # fmt: skip
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(128, 6, 16)).astype(np.float32))
    args = ["defend", str(src), "--calib", str(tmp_path / "calib.npz"), "--out", str(tmp_path / "d.onnx")]
    assert main([*args, "--iters", "20", "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["verify"]["integers_ok"] and summary["layers"] >= 5
    assert any(name.startswith("/layer/Constant") for name in summary["constants"])
    assert "quant_pre_process cannot prepare the model" in caplog.text


def test_staged_outputs_are_named_as_the_user_asked(tmp_path):
    from efrap_plugin import staged

    with pytest.raises(PlanMismatchError) as caught:
        with staged(tmp_path / "out.onnx") as hidden:
            raise PlanMismatchError(f"verify: {hidden} does not hold the plan's integers")
    assert str(caught.value) == f"verify: {tmp_path / 'out.onnx'} does not hold the plan's integers"


def _brevitas_model(second_quant):
    import brevitas.nn as qnn
    from brevitas.quant import Int8WeightPerChannelFloat

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = qnn.QuantConv2d(1, 8, 3, padding=1, weight_quant=Int8WeightPerChannelFloat)
            self.c2 = qnn.QuantConv2d(8, 8, 3, padding=1, weight_quant=second_quant)
            self.fc = qnn.QuantLinear(8 * 64, 10, bias=True, weight_quant=Int8WeightPerChannelFloat)

        def forward(self, x):
            return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))

    torch.manual_seed(0)
    return Net().eval()


def test_a_brevitas_quantizer_without_a_rounding_step_is_named_and_the_rest_defended(digits):
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.quant import Int4WeightPerTensorFloatDecoupled

    from efrap_brevitas import defend_quant_model

    model = _brevitas_model(Int4WeightPerTensorFloatDecoupled)
    with torch.no_grad(), calibration_mode(model):
        model(digits.train.x[:64])
    plan = defend_quant_model(
        model, digits.train.x[:64], FAST.replace(calib_size=64, iters=5), progress=False
    )
    assert list(plan.layers) == ["c1", "fc"] and "no integer rounding step" in plan.meta.skipped["c2"]


def test_a_failed_brevitas_defense_leaves_the_model_as_it_was(digits):
    """The second layer's objective overflows: the first layer's installed rounding is taken back."""
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.quant import Int8WeightPerChannelFloat

    from efrap_brevitas import defend_quant_model
    from efrap_brevitas.rounding import rounding_of

    model = _brevitas_model(Int8WeightPerChannelFloat)
    with torch.no_grad():
        model.c2.weight.mul_(1e30)  # finite, but its squared error is not
    with torch.no_grad(), calibration_mode(model):
        model(digits.train.x[:64])
    impl = type(model.c1.weight_quant.tensor_quant.int_quant.float_to_int_impl)
    with pytest.raises(EFRAPError, match="layer 'c2': the objective is not finite"):
        defend_quant_model(model, digits.train.x[:64], FAST.replace(calib_size=64, iters=5), progress=False)
    assert rounding_of(model.c1) is None
    assert type(model.c1.weight_quant.tensor_quant.int_quant.float_to_int_impl) is impl


def test_a_plan_path_that_is_a_pipe_is_named_as_such(tmp_path):
    import os

    fifo = tmp_path / "plan.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ModelError, match="is not a regular file"):
        RoundingPlan.load(fifo)


def test_verify_qcdq_checks_each_quantized_bias_against_the_model(digits, tmp_path):
    """A file whose quantized bias no longer rounds the model's fails against the user's model; without
    the model the bias is named unchecked."""
    import brevitas.nn as qnn
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.quant import Int8ActPerTensorFloat, Int8Bias, Int8WeightPerChannelFloat

    from efrap_brevitas import defend_quant_model, export_qcdq, verify_qcdq

    model = _brevitas_model(Int8WeightPerChannelFloat)
    model.fc = qnn.QuantLinear(
        8 * 64, 10, bias=True, weight_quant=Int8WeightPerChannelFloat,
        input_quant=Int8ActPerTensorFloat, bias_quant=Int8Bias,
    )  # fmt: skip
    with torch.no_grad(), calibration_mode(model):
        model(digits.train.x[:64])
    plan = defend_quant_model(
        model, digits.train.x[:64], FAST.replace(calib_size=64, iters=5), progress=False
    )
    path = export_qcdq(model, digits.train.x[:1], tmp_path / "m.onnx")
    assert verify_qcdq(path, plan, model).integers_ok
    assert bool(_file_holds_a_nonzero_bias(path))
    with torch.no_grad():
        model.fc.bias.zero_()  # the file's (nonzero) bias no longer rounds the model's
    report = verify_qcdq(path, plan, model, strict=False)
    assert report.bias_mismatches == ["fc.bias"] and not report.integers_ok
    assert "fc.bias" in verify_qcdq(path, plan, strict=False).unchecked


def _file_holds_a_nonzero_bias(path) -> bool:
    from efrap_brevitas import read_qcdq_weights

    return any(w.bias is not None and bool(w.bias.abs().max() > 0) for w in read_qcdq_weights(path).values())


def test_a_file_size_limit_is_named_not_blamed_on_the_model(pq8_onnx, tmp_path):
    """Under `ulimit -f` onnxruntime's pre-processing cannot write its temporary files: the error says the
    file system refused a write and what to do, and nothing is left at --out."""
    out = tmp_path / "d.onnx"
    command = (
        f"ulimit -f 20; exec {sys.executable} -m efrap_cli.main defend {pq8_onnx} --calib digits "
        f"--out {out} --iters 5 --quiet"
    )
    ran = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 1 and "file-size limit (ulimit -f)" in ran.stderr
    assert "cannot prepare" not in ran.stderr and "Traceback" not in ran.stderr and not out.exists()
