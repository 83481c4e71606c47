"""EFRAP on the user's own Brevitas models: their quantizers (int2-8, per-tensor / per-channel, float or
power-of-two scales, signed or shifted unsigned), QuantTensor passing, BN and residual adds, the graph
flow and hand-built layers. Integers are read back from the QCDQ file Brevitas' own exporter writes."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import brevitas.nn as qnn
import pytest
import torch
from brevitas.graph.calibrate import calibration_mode
from brevitas.graph.quantize import (
    COMPUTE_LAYER_MAP,
    LAYERWISE_COMPUTE_LAYER_MAP,
    layerwise_quantize,
    preprocess_for_quantize,
    quantize,
)
from brevitas.quant import (
    Int8ActPerTensorFloat,
    Int8WeightPerChannelFloat,
    Int8WeightPerTensorFixedPoint,
    Int8WeightPerTensorFloat,
    ShiftedUint8WeightPerTensorFloat,
)
from example_runs import assert_defended, assert_example_takes_the_config, run_example
from torch import nn

from efrap_brevitas import (
    EFRAPRound,
    apply_plan,
    defend_quant_model,
    export_qcdq,
    quantize_brevitas,
    quantizer_scheme,
    read_qcdq_weights,
    verify_qcdq,
    with_efrap,
)
from efrap_onnx import kernel_check, session
from efrap_plugin import EFRAPConfig, EFRAPError, ModelError, PlanMismatchError, RoundingPlan
from efrap_plugin.redteam import evaluate, predict
from efrap_plugin.redteam.models import BasicBlock

pytestmark = pytest.mark.filterwarnings("ignore:Computing zero point of output accumulator")

FAST = EFRAPConfig(iters=40, calib_size=256)

# name -> (weight quantizer, layer keywords, the integer range it stores)
QUANTIZERS = {
    "int8-per-channel-float": (Int8WeightPerChannelFloat, {}, (-127, 127)),
    "int8-per-tensor-fixed-point": (Int8WeightPerTensorFixedPoint, {}, (-127, 127)),
    "int4-per-channel-float": (Int8WeightPerChannelFloat, {"weight_bit_width": 4}, (-7, 7)),
    "int3-per-tensor-float-full-range": (
        Int8WeightPerTensorFloat.let(narrow_range=False),
        {"weight_bit_width": 3},
        (-4, 3),
    ),
    "uint8-shifted-per-tensor": (ShiftedUint8WeightPerTensorFloat, {}, (0, 255)),
}


def _layer(cls, *args, quant, return_quant_tensor=False, **kwargs):
    weight_quant, options, _ = QUANTIZERS[quant]
    return cls(
        *args,
        weight_quant=weight_quant,
        input_quant=Int8ActPerTensorFloat,
        return_quant_tensor=return_quant_tensor,
        **options,
        **kwargs,
    )


class HandBuilt(nn.Module):
    """brevitas.nn layers as a user writes them: Conv-BN-ReLU, a residual add, ConvTranspose, Linear."""

    def __init__(self, quant: str) -> None:
        super().__init__()
        self.stem = _layer(qnn.QuantConv2d, 1, 8, 3, padding=1, quant=quant)
        self.bn = nn.BatchNorm2d(8)
        self.relu = qnn.QuantReLU()
        self.branch = _layer(qnn.QuantConv2d, 8, 8, 3, padding=1, bias=False, quant=quant)
        self.up = _layer(qnn.QuantConvTranspose2d, 8, 4, 2, stride=2, quant=quant)
        self.head = _layer(qnn.QuantLinear, 4 * 16 * 16, 10, quant=quant)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        x = x + self.branch(x)
        return self.head(torch.flatten(self.up(x), 1))


class QuantTensorChain(nn.Module):
    """Layers passing QuantTensors to each other (return_quant_tensor=True), as Brevitas' FINN-style
    examples do; depthwise conv included."""

    def __init__(self, quant: str) -> None:
        super().__init__()
        self.inp = qnn.QuantIdentity(return_quant_tensor=True)
        self.conv1 = _layer(qnn.QuantConv2d, 1, 8, 3, padding=1, quant=quant, return_quant_tensor=True)
        self.relu1 = qnn.QuantReLU(return_quant_tensor=True)
        self.dw = _layer(qnn.QuantConv2d, 8, 8, 3, padding=1, groups=8, quant=quant, return_quant_tensor=True)
        self.relu2 = qnn.QuantReLU(return_quant_tensor=True)
        self.fc = _layer(qnn.QuantLinear, 8 * 8 * 8, 10, quant=quant)

    def forward(self, x):
        x = self.relu2(self.dw(self.relu1(self.conv1(self.inp(x)))))
        return self.fc(x.flatten(1))


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = BasicBlock(8, 16, 2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def _layer_map(base: dict, quant: str) -> dict:
    weight_quant, options, _ = QUANTIZERS[quant]
    layer_map = dict(base)
    for float_cls in (nn.Conv2d, nn.Linear):
        quant_cls, kwargs = layer_map[float_cls]
        layer_map[float_cls] = (quant_cls, {**kwargs, "weight_quant": weight_quant, **options})
    return layer_map


def graph_quantized(quant: str) -> nn.Module:
    """Brevitas' graph flow on a float ResNet block: BN folded, residual add requantized, QuantTensors."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = preprocess_for_quantize(SmallResNet().eval())
        return quantize(model, compute_layer_map=_layer_map(COMPUTE_LAYER_MAP, quant))


def layerwise_quantized(quant: str) -> nn.Module:
    """Brevitas' layerwise_quantize: each Conv / Linear swapped in place, BN kept in float, plain tensors."""
    torch.manual_seed(0)
    return layerwise_quantize(SmallResNet(), compute_layer_map=_layer_map(LAYERWISE_COMPUTE_LAYER_MAP, quant))


MODELS = {
    "hand-built-bn-residual": lambda q: HandBuilt(q),
    "quant-tensor-chain": lambda q: QuantTensorChain(q),
    "graph-flow-resnet": graph_quantized,
    "layerwise-resnet": layerwise_quantized,
}


def calibrated(model: nn.Module, calib: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model.train()  # BN statistics, as a user's float model would have
    with torch.no_grad():
        model(calib)
    with torch.no_grad(), calibration_mode(model):
        for batch in calib.split(64):
            model(batch)
    return model.eval()


def build(model: str, quant: str, calib: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    return calibrated(MODELS[model](quant), calib)


# Brevitas itself cannot pass QuantTensors out of a layer with shifted (zero-point) weights ("Computing
# zero point of output accumulator not supported yet"), so that family runs on the plain-tensor model.
CASES = [
    (model, quant)
    for model in MODELS
    for quant in QUANTIZERS
    if not (quant == "uint8-shifted-per-tensor" and model in ("quant-tensor-chain", "graph-flow-resnet"))
]


@pytest.mark.parametrize(("model_name", "quant"), CASES)
def test_learned_integers_come_out_of_the_users_own_qcdq_export(model_name, quant, digits, tmp_path):
    calib = digits.train.x[:256]
    model = build(model_name, quant, calib)
    nearest = {
        n: m.quant_weight().int().to(torch.int32)
        for n, m in model.named_modules()
        if hasattr(m, "quant_weight") and m.weight_quant.is_quant_enabled
    }
    plan = defend_quant_model(model, calib, FAST, progress=False)
    assert sorted(plan.layers) == sorted(nearest)  # every weight-quantized layer is defended
    path = export_qcdq(model, calib[:1], tmp_path / "efrap.onnx")
    stored = read_qcdq_weights(path, list(plan.layers))
    report = verify_qcdq(path, plan, model)
    assert report.integers_ok and report.matching == len(nearest)
    lo, hi = QUANTIZERS[quant][2]
    flipped = 0
    for name, lp in plan.layers.items():
        assert (stored[name].qmin, stored[name].qmax) == (lo, hi), name  # the user's grid, not ours
        assert torch.equal(stored[name].integers, lp.integers.to(torch.int32)), name
        assert int(stored[name].integers.min()) >= lo and int(stored[name].integers.max()) <= hi
        flipped += int((stored[name].integers != nearest[name]).sum())
    assert flipped > 0  # the file holds learned, not nearest, rounding
    # the user's model (in torch) and onnxruntime agree on the defended model
    with torch.no_grad():
        in_torch = predict(model, digits.test.x[:128])
    assert (in_torch == predict(session(path, exact=True), digits.test.x[:128])).float().mean() >= 0.95


def test_graph_flow_removes_the_backdoor_in_onnxruntime(pq8, digits, tmp_path):
    """The attacked fixture (aimed at max|w|/127 per channel, Int8WeightPerChannelFloat's grid) through
    preprocess_for_quantize + quantize + calibration_mode: stock fires, EFRAP's export does not."""
    layer_map = _layer_map(COMPUTE_LAYER_MAP, "int8-per-channel-float")

    def ptq():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = quantize(
                preprocess_for_quantize(copy.deepcopy(pq8.model).eval()), compute_layer_map=layer_map
            )
        with torch.no_grad(), calibration_mode(model):
            for batch in digits.train.x[:1024].split(64):
                model(batch)
        return model.eval()

    stock, defended = ptq(), ptq()
    plan = defend_quant_model(defended, digits.train.x[:1024], progress=False)
    stock_m = evaluate(
        session(export_qcdq(stock, digits.train.x[:1], tmp_path / "stock.onnx"), exact=True),
        digits.test,
        pq8.trigger,
    )
    path = export_qcdq(defended, digits.train.x[:1], tmp_path / "efrap.onnx")
    assert verify_qcdq(path, plan, defended).integers_ok
    kernels = kernel_check(path, digits.train.x[:256].numpy())
    assert kernels.ok if kernels.cpu.vnni else (kernels.ok or kernels.diverging_layers)
    float_m = evaluate(pq8.model, digits.test, pq8.trigger)
    efrap_m = evaluate(session(path, exact=True), digits.test, pq8.trigger)
    assert stock_m.asr >= 0.90
    assert efrap_m.asr <= max(0.03, float_m.asr + 0.01)
    assert efrap_m.clean_acc >= float_m.clean_acc - 0.01


def test_with_efrap_is_a_config_flag_that_rounds_to_nearest_until_defended(digits, tmp_path):
    calib = digits.train.x[:256]
    torch.manual_seed(0)
    plain = calibrated(QuantTensorChain("int8-per-channel-float"), calib)
    flagged = copy.deepcopy(plain)
    torch.manual_seed(0)
    flagged_model = QuantTensorChain("int8-per-channel-float")
    for name in ("conv1", "dw", "fc"):  # the user's layers, built with the flagged quantizer
        old = getattr(flagged_model, name)
        kwargs = {"groups": 8, "padding": 1} if name == "dw" else {"padding": 1} if name == "conv1" else {}
        args = (old.in_channels, old.out_channels, 3) if name != "fc" else (old.in_features, old.out_features)
        cls = qnn.QuantLinear if name == "fc" else qnn.QuantConv2d
        new = cls(
            *args,
            weight_quant=with_efrap(Int8WeightPerChannelFloat),
            input_quant=Int8ActPerTensorFloat,
            return_quant_tensor=name != "fc",
            **kwargs,
        )
        setattr(flagged_model, name, new)
    flagged_model.load_state_dict(plain.state_dict(), strict=False)
    flagged = calibrated(flagged_model, calib)
    rounding = flagged.conv1.weight_quant.tensor_quant.int_quant.float_to_int_impl
    assert isinstance(rounding, EFRAPRound) and not rounding.learned
    assert torch.equal(flagged.conv1.quant_weight().int(), plain.conv1.quant_weight().int())  # nearest
    plan = defend_quant_model(flagged, calib, FAST, progress=False)
    assert (
        flagged.conv1.weight_quant.tensor_quant.int_quant.float_to_int_impl is rounding and rounding.learned
    )
    assert torch.equal(flagged.conv1.quant_weight().int().to(torch.int32), plan["conv1"].integers)
    assert verify_qcdq(export_qcdq(flagged, calib[:1], tmp_path / "m.onnx"), plan, flagged).integers_ok


def test_a_saved_plan_reinstalls_on_the_rebuilt_model(digits, tmp_path):
    calib = digits.train.x[:256]
    model = build("hand-built-bn-residual", "int4-per-channel-float", calib)
    plan = defend_quant_model(model, calib, FAST, progress=False)
    loaded = RoundingPlan.load(plan.save(tmp_path / "plan.safetensors"))
    assert loaded.meta.grids["up"]["axis"] == 1  # ConvTranspose: channels on axis 1
    rebuilt = build("hand-built-bn-residual", "int4-per-channel-float", calib)
    rebuilt.load_state_dict(model.state_dict())
    apply_plan(rebuilt, loaded)
    assert verify_qcdq(export_qcdq(rebuilt, calib[:1], tmp_path / "m.onnx"), loaded, rebuilt).integers_ok
    with torch.no_grad():
        rebuilt.head.weight.add_(0.01)
    with pytest.raises(EFRAPError, match=r"layer 'head' holds other weights than the plan was learned on"):
        apply_plan(rebuilt, loaded)
    # the same weights behind int8 quantizers: the 4-bit plan is refused, naming both grids
    int8 = build("hand-built-bn-residual", "int8-per-channel-float", calib)
    int8.load_state_dict(model.state_dict())
    with pytest.raises(EFRAPError, match=r"rounds to \[-127, 127\] .* learned on \[-7, 7\]"):
        apply_plan(int8, loaded)


def test_verify_names_a_substituted_quantizer_a_changed_bit_width_and_a_layer_left_out(digits, tmp_path):
    calib = digits.train.x[:256]
    model = build("quant-tensor-chain", "int4-per-channel-float", calib)
    plan = defend_quant_model(model, calib, FAST, progress=False)
    # the same weights exported through int8 quantizers: another integer range on every layer
    int8 = build("quant-tensor-chain", "int8-per-channel-float", calib)
    int8.load_state_dict(model.state_dict())
    report = verify_qcdq(export_qcdq(int8, calib[:1], tmp_path / "int8.onnx"), plan, strict=False)
    assert not report.integers_ok
    assert report.grid_mismatches["conv1"] == "stored on [-127, 127], planned on [-7, 7]"
    with pytest.raises(PlanMismatchError, match=r"other grids \{'conv1'"):
        verify_qcdq(tmp_path / "int8.onnx", plan)
    # a layer the plan lacks is named, in the file and in the user's model
    path = export_qcdq(model, calib[:1], tmp_path / "efrap.onnx")
    partial = RoundingPlan(
        plan.scheme, {k: v for k, v in plan.layers.items() if k != "dw"}, plan.source, plan.meta
    )
    report = verify_qcdq(path, partial, model, strict=False)
    assert report.unplanned == ["dw"] and not report.integers_ok
    # the model's quantizer changed after export: its integers no longer match the file's
    with torch.no_grad():
        model.fc.weight.mul_(1.5)
    report = verify_qcdq(path, plan, model, strict=False)
    assert "fc" in report.mismatched or "fc" in report.scale_mismatches


def test_quantizer_scheme_reads_the_grid_an_attack_must_aim_at():
    pot = quantizer_scheme(Int8WeightPerTensorFixedPoint)
    assert (pot.qmin, pot.qmax, pot.per_channel, pot.power_of_two_scale) == (-127, 127, False, True)
    int4 = quantizer_scheme(Int8WeightPerChannelFloat, weight_bit_width=4)
    assert (int4.bits, int4.qmin, int4.qmax, int4.per_channel, int4.power_of_two_scale) == (
        4,
        -7,
        7,
        True,
        False,
    )
    w = torch.tensor([[0.3, -0.1], [0.05, 0.2]])
    scale, _ = pot.qparams(w)
    assert float(scale) == 2.0**-8  # 0.3 / 127 = 2^-8.7, rounded up to a power of two
    with pytest.raises(EFRAPError, match=r"weight_quant: Brevitas cannot build a layer"):
        quantizer_scheme(Int8WeightPerChannelFloat, weight_bit_width="eight")


def test_bad_input_is_refused_with_the_fix(pq8, digits):
    calib = digits.train.x[:64]
    with pytest.raises(ModelError, match=r"no brevitas.nn QuantConv / QuantConvTranspose / QuantLinear"):
        defend_quant_model(pq8.model, calib, FAST, progress=False)
    model = build("quant-tensor-chain", "int8-per-channel-float", calib)
    with pytest.raises(EFRAPError, match=r"quantize_brevitas would replace them"):
        quantize_brevitas(model, calib)
    with pytest.raises(EFRAPError, match=r"layer_inputs: expected 'quantized', 'float' or 'mixed'"):
        defend_quant_model(model, calib, FAST, layer_inputs="fp32", progress=False)
    with pytest.raises(EFRAPError, match=r"with_efrap: expected a Brevitas weight quantizer"):
        with_efrap("int8")


@pytest.mark.parametrize(
    "weight_quant, fixture",
    [
        ("int8-per-channel-float", "pqbackdoor-ort8"),  # Int8WeightPerChannelFloat: onnxruntime's int8 grid
        # the other two options, about 20 s each: `make test-slow`
        pytest.param("int4-per-channel-float", "pqbackdoor-brevitas-int4-pc", marks=pytest.mark.slow),
        pytest.param(
            "int8-per-tensor-fixed-point", "pqbackdoor-brevitas-int8-pt-pot", marks=pytest.mark.slow
        ),
    ],
)
def test_ptq_example_removes_a_qcb_aimed_at_its_weight_quantizer(weight_quant, fixture):
    row = run_example(
        "brevitas_ptq.py", "--weight-quant", weight_quant, "--model", f"tests/fixtures/{fixture}"
    )
    assert_defended(row)
    assert row["layers"] == 4
    # 8-bit Brevitas weights saturate onnxruntime's u8 x s8 kernels without VNNI: there the example also
    # gives the kernels' figures; a CPU with VNNI computes the graph
    assert row["kernels_ok"] or ("no VNNI" in row["cpu"] and "kernels_efrap_acc" in row)


def test_ptq_example_defends_with_the_config_given_as_json():
    assert_example_takes_the_config("brevitas_ptq.py", "--model", "tests/fixtures/pqbackdoor-ort8")


def test_the_core_refuses_a_brevitas_model_instead_of_guessing_its_grid(digits):
    from efrap_plugin import defend

    model = build("quant-tensor-chain", "int4-per-channel-float", digits.train.x[:64])
    with pytest.raises(
        ModelError, match=r"layer 'conv1' is a Brevitas QuantConv2d .* efrap_brevitas.defend_quant_model"
    ):
        defend(model, digits.train.x[:64], "brevitas-int8", FAST, progress=False)


class _TokenBlock(nn.Module):
    """A transformer-style block the way a Brevitas user writes it: QuantMultiheadAttention and a
    QuantLinear on N x T x D tokens (both exported as weight -> DequantizeLinear -> Transpose -> MatMul)."""

    def __init__(self):
        super().__init__()
        self.inp = qnn.QuantIdentity()
        self.attn = qnn.QuantMultiheadAttention(16, 2, batch_first=True)
        self.mlp = qnn.QuantLinear(16, 16, bias=True)
        self.head = qnn.QuantLinear(16, 4, bias=True)

    def forward(self, x):
        x = self.inp(x)
        a, _ = self.attn(x, x, x)
        return self.head(torch.relu(self.mlp(a)).mean(1))


def test_attention_and_token_linears_are_read_back_from_the_qcdq_export(tmp_path):
    """Every weight of a token model (attention in / out projections, a Linear on 3-D inputs) is defended
    and read back from the user's QCDQ export; a changed integer in the attention's weights is caught."""
    torch.manual_seed(0)
    calib = torch.randn(256, 5, 16)
    model = calibrated(_TokenBlock().eval(), calib)
    plan = defend_quant_model(model, calib, FAST, progress=False)
    assert sorted(plan.layers) == ["attn.in_proj", "attn.out_proj", "head", "mlp"]
    path = export_qcdq(model, calib[:1], tmp_path / "tokens.onnx")
    report = verify_qcdq(path, plan, model)
    assert report.integers_ok and report.matching == 4
    tampered = {name: lp for name, lp in plan.layers.items()}
    changed = tampered["attn.in_proj"].integers.clone()
    changed.view(-1)[0] += 1 if int(changed.view(-1)[0]) < 127 else -1
    tampered["attn.in_proj"] = dataclasses.replace(tampered["attn.in_proj"], integers=changed)
    with pytest.raises(PlanMismatchError, match=r"'attn.in_proj': 1\b"):
        verify_qcdq(path, dataclasses.replace(plan, layers=tampered), model)


class _Tokens(nn.Module):
    """Token ids in, an int8 QuantEmbedding table, a QuantLinear head."""

    def __init__(self):
        super().__init__()
        self.embed = qnn.QuantEmbedding(50, 16, weight_quant=Int8WeightPerTensorFloat)
        self.head = qnn.QuantLinear(16, 4, bias=True)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


def test_token_ids_calibrate_and_a_quantized_embedding_is_named_and_read_back(tmp_path):
    """Integer token ids are calibration data as they are; the QuantEmbedding's int8 table, which EFRAP
    does not learn, is named with the reason and read back from the export, so verify accounts for it."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (256, 5))
    model = calibrated(_Tokens().eval(), ids)
    plan = defend_quant_model(model, ids, FAST, progress=False)
    assert list(plan.layers) == ["head"]
    assert plan.meta.skipped == {"embed": "QuantEmbedding: not a Conv / Linear layer EFRAP learns"}
    path = export_qcdq(model, ids[:1], tmp_path / "tokens.onnx")
    assert sorted(read_qcdq_weights(path, ["head", "embed"])) == ["embed", "head"]
    report = verify_qcdq(path, plan, model)
    assert report.integers_ok and report.skipped == ["embed"]
    unlisted = dataclasses.replace(plan, meta=plan.meta.replace(skipped={}))
    with pytest.raises(PlanMismatchError, match=r"quantized layers the plan lacks \['embed'\]"):
        verify_qcdq(path, unlisted)


def test_efrap_mode_is_one_context_beside_calibration_mode(digits, tmp_path):
    """Brevitas' algorithm-context form: `with efrap_mode(model) as efrap, calibration_mode(model):` around
    the user's calibration loop learns, on leaving, the one-call route's integers, in their export."""
    from efrap_brevitas import efrap_mode

    calib = digits.train.x[:256]
    torch.manual_seed(0)
    flagged = MODELS["graph-flow-resnet"]("int8-per-channel-float")
    torch.manual_seed(0)
    called = calibrated(MODELS["graph-flow-resnet"]("int8-per-channel-float"), calib)
    flagged.train()
    with torch.no_grad():  # BN statistics, as calibrated() gives them
        torch.manual_seed(0)
        flagged(calib)
    with torch.no_grad(), efrap_mode(flagged, FAST, progress=False) as efrap, calibration_mode(flagged):
        for batch in calib.split(64):
            flagged(batch)
    flagged.eval()
    plan = defend_quant_model(called, calib, FAST, progress=False)
    assert efrap.plan is not None and list(efrap.plan.layers) == list(plan.layers)
    assert all(torch.equal(efrap.plan[n].integers, lp.integers) for n, lp in plan.layers.items())
    path = export_qcdq(flagged, calib[:1], tmp_path / "flag.onnx")
    assert verify_qcdq(path, efrap.plan, flagged).integers_ok and efrap.plan.flipped_share > 0
    # opened inside calibration_mode, it would leave first, with the weight quantizers still off
    late = calibrated(MODELS["graph-flow-resnet"]("int8-per-channel-float"), calib)
    with pytest.raises(EFRAPError, match="open efrap_mode first"):
        with torch.no_grad(), calibration_mode(late), efrap_mode(late, FAST):
            late(calib[:64])
    with pytest.raises(EFRAPError, match="no input went through the model"):
        with efrap_mode(late, FAST):
            pass


@pytest.mark.slow  # two example runs, about 45 s: `make test-slow`; efrap_mode itself is tested above
def test_ptq_example_gives_the_same_model_by_either_route():
    """examples/brevitas_ptq.py --route flag (efrap_mode beside calibration_mode) measures what the one
    call does: the same integers, so the same figures."""
    from example_runs import run_example

    call, flag = (
        run_example("brevitas_ptq.py", "--model", "tests/fixtures/pqbackdoor-ort8", "--route", r)
        for r in ("call", "flag")
    )
    assert call.pop("route") == "call" and flag.pop("route") == "flag"
    assert call == flag and flag["integers_ok"]
