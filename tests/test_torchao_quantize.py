"""EFRAP for torchao's ``quantize_``: the grid read from the user's base config (per row, per tensor,
per group; 2- to 8-bit), the learned integers in torchao's own quantized tensors, read back."""

from __future__ import annotations

import copy

import pytest
import torch
from example_runs import assert_defended, run_example
from torch import nn

from efrap_plugin import EFRAPConfig, EFRAPError, PlanMismatchError, RoundingPlan

pytest.importorskip("torchao")
from torchao.quantization import (  # noqa: E402
    Float8WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8DynamicActivationIntxWeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
)
from torchao.quantization import quantize_ as torchao_quantize_  # noqa: E402
from torchao.quantization.granularity import PerAxis, PerGroup, PerRow, PerTensor  # noqa: E402
from torchao.quantization.quant_primitives import MappingType  # noqa: E402

from efrap_torchao import quantize_, quantize_scheme, read_quantized_weights, verify_quantize  # noqa: E402

FAST = EFRAPConfig(iters=30, calib_size=128)

CONFIGS = {
    "int8-weight-only": lambda: Int8WeightOnlyConfig(),
    "int8-weight-only-per-tensor": lambda: Int8WeightOnlyConfig(granularity=PerTensor()),
    "int8-weight-only-g64": lambda: Int8WeightOnlyConfig(granularity=PerGroup(64)),
    "int8-dynamic": lambda: Int8DynamicActivationInt8WeightConfig(),
    "intx-int4-g32": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
    "intx-int2-per-row": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int2, granularity=PerAxis(0)),
    "intx-int6-g128": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int6, granularity=PerGroup(128)),
    "int8-dynamic-intx-int4-g32": lambda: Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(32)
    ),
}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 64)
        self.up = nn.Linear(64, 256)
        self.down = nn.Linear(256, 128)
        self.head = nn.Linear(128, 16, bias=False)
        self.head.weight = nn.Parameter(torch.randn(16, 128) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.down(torch.relu(self.up(x.flatten(1))))))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture(scope="module")
def calib(digits):
    return digits.train.x[:128]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_scheme_rounds_as_torchao_does_bit_for_bit(name):
    """Scale, zero point and integers equal torchao's own, on a weight with an all-zero group too."""
    torch.manual_seed(1)
    layer = nn.Linear(256, 48)
    with torch.no_grad():
        layer.weight[3, :128] = 0
        layer.weight[5] *= 1e-3
    weight = layer.weight.detach().clone()
    scheme, _ = quantize_scheme(CONFIGS[name]())
    model = nn.Sequential(layer)
    torchao_quantize_(model, CONFIGS[name]())
    ints, scales, zero_points = read_quantized_weights(model)
    scale, zero_point = scheme.qparams(weight)
    assert torch.equal(scheme.quantize(weight, scale, zero_point), ints["0"])
    assert torch.equal(scale.reshape(-1), scales["0"].reshape(-1))
    assert torch.equal(zero_point.to(torch.int64).reshape(-1), zero_points["0"].reshape(-1))


@pytest.mark.parametrize(
    "name", ["int8-weight-only", "int8-dynamic", "intx-int4-g32", "int8-weight-only-g64"]
)
def test_quantize_writes_the_plans_integers_into_torchaos_own_tensors(mlp, calib, name):
    model = copy.deepcopy(mlp)
    stock = copy.deepcopy(mlp)
    torchao_quantize_(stock, CONFIGS[name]())
    plan = quantize_(model, CONFIGS[name](), calib, FAST, progress=False)
    assert list(plan.layers) == ["up", "down", "head"] and plan.meta.flow == "torchao-quantize_"
    report = verify_quantize(model, plan)
    assert report.integers_ok and report.matching == 3 and report.unplanned == []
    assert verify_quantize(model.state_dict(), plan).integers_ok  # what a saved state dict holds
    exported = torch.export.export(model, (calib[:2],))  # and what an exported program holds
    assert verify_quantize(exported, plan).integers_ok
    for layer in ("up", "down", "head"):  # the same tensor subclass and scales torchao's own call makes
        ours, theirs = getattr(model, layer).weight, getattr(stock, layer).weight
        assert type(ours) is type(theirs) and torch.equal(ours.scale, theirs.scale)
    stock_ints, _, _ = read_quantized_weights(stock)
    ints, _, _ = read_quantized_weights(model)
    assert any(not torch.equal(ints[k], stock_ints[k]) for k in ints)  # EFRAP's rounding, not nearest
    out = model(calib[:8])
    assert out.shape == (8, 16) and bool(torch.isfinite(out).all())


class TiedHead(nn.Module):
    """An output projection tied to the input embedding, as language models tie them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 64)
        self.up = nn.Linear(64, 64)
        self.out = nn.Linear(64, 16, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.up(x.flatten(1))))


def test_the_filter_is_asked_of_the_users_own_modules_as_torchao_asks_it(mlp, calib):
    model = copy.deepcopy(mlp)
    plan = quantize_(
        model, CONFIGS["int8-weight-only"](), calib, FAST, filter_fn=lambda m, fqn: m is model.down
    )
    assert list(plan.layers) == ["down"] and verify_quantize(model, plan).integers_ok
    assert type(model.up.weight.data) is torch.Tensor  # not selected: left in float by torchao too


def test_a_weight_tied_to_an_embedding_is_not_written_through(calib):
    torch.manual_seed(0)
    model = TiedHead().eval()
    before = model.embed.weight.detach().clone()
    plan = quantize_(model, CONFIGS["int8-weight-only"](), calib, FAST, progress=False)
    assert list(plan.layers) == ["up", "out"] and verify_quantize(model, plan).integers_ok
    assert torch.equal(model.embed.weight, before)


def test_verify_fails_on_changed_integers_and_on_a_layer_the_plan_lacks(mlp, calib):
    model = copy.deepcopy(mlp)
    plan = quantize_(model, CONFIGS["intx-int4-g32"](), calib, FAST, progress=False)
    saved = {k: v for k, v in model.state_dict().items()}
    qdata = model.up.weight.qdata
    qdata[0, 0] = 7 if int(qdata[0, 0]) != 7 else 6
    with pytest.raises(PlanMismatchError):
        verify_quantize(model, plan)
    qdata[0, 0] = plan.layers["up"].integers[0, 0]
    assert verify_quantize(model, plan).integers_ok
    for field in ("scale", "zero_point"):  # the integers right, what dequantizes them moved
        moved = getattr(model.down.weight, field)
        moved[1, 1] += 1
        with pytest.raises(PlanMismatchError, match=field.replace("_", " ") + " mismatches"):
            verify_quantize(model, plan)
        moved[1, 1] -= 1
    partial = RoundingPlan(
        plan.scheme, {k: v for k, v in plan.layers.items() if k != "down"}, plan.source, plan.meta
    )
    with pytest.raises(PlanMismatchError):
        verify_quantize(saved, partial)


def test_a_per_group_plan_saves_and_loads(mlp, calib, tmp_path):
    plan = quantize_(copy.deepcopy(mlp), CONFIGS["intx-int4-g32"](), calib, FAST, progress=False)
    loaded = RoundingPlan.load(plan.save(tmp_path / "plan.safetensors"))
    assert loaded.scheme.group_size == 32 and loaded.layers["up"].scale.shape == (256, 2)
    assert all(torch.equal(loaded.layers[k].integers, plan.layers[k].integers) for k in plan.layers)


@pytest.mark.parametrize(
    "config, match",
    [
        (Float8WeightOnlyConfig(), "Float8WeightOnlyConfig is not one EFRAP learns"),
        (
            IntxWeightOnlyConfig(weight_dtype=torch.int4, mapping_type=MappingType.ASYMMETRIC),
            "SYMMETRIC weight grid",
        ),
        (Int8DynamicActivationInt8WeightConfig(reduce_range=True), "reduce_range=True"),
    ],
)
def test_configs_efrap_does_not_learn_are_refused_naming_the_field(mlp, calib, config, match):
    model = copy.deepcopy(mlp)
    with pytest.raises(EFRAPError, match=match):
        quantize_(model, config, calib, FAST, progress=False)
    assert isinstance(model.up.weight, nn.Parameter) and type(model.up.weight.data) is torch.Tensor


def test_a_group_size_that_does_not_divide_the_inputs_is_refused(calib):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    with pytest.raises(EFRAPError, match="do not split into groups of 64"):
        quantize_(model, Int8WeightOnlyConfig(granularity=PerGroup(64)), calib, FAST, progress=False)


def test_per_row_is_the_default_granularity():
    scheme, acts = quantize_scheme(Int8DynamicActivationInt8WeightConfig(granularity=[PerRow(), PerRow()]))
    assert scheme.per_channel and scheme.group_size is None and acts == "per-token-symmetric"


@pytest.mark.parametrize(
    "config, fixture, route",
    [
        ("int8-weight-only", "pqbackdoor-torchao-int8-mlp", "call"),
        ("int8-dynamic", "pqbackdoor-torchao-int8-mlp", "call"),
        ("intx-int4-g32", "pqbackdoor-torchao-int4-g32-mlp", "call"),
    ],
)
def test_quantize_example_removes_a_qcb_aimed_at_its_config(config, fixture, route):
    """The attack fires through torchao's own quantize_ (stock asr >= 90) and not through EFRAP's."""
    row = run_example(
        "torchao_quantize.py", "--config", config, "--model", f"tests/fixtures/{fixture}", "--route", route
    )
    assert_defended(row)
    assert row["layers"] == 3 and row["route"] == route


def test_quantize_example_config_form_removes_the_qcb():
    """The config form learns each layer alone on float inputs: the backdoor goes; its accuracy cost,
    larger than the call's and close to the bar's point, is what benchmarks/results/quantize.md
    measures (learned roundings differ with a CPU's kernels), so here it is held to two points."""
    fixture = "tests/fixtures/pqbackdoor-torchao-int4-g32-mlp"
    row = run_example(
        "torchao_quantize.py", "--config", "intx-int4-g32", "--model", fixture, "--route", "config"
    )
    assert row["integers_ok"] and row["stock_asr"] >= 90 and row["route"] == "config"
    assert row["efrap_asr"] <= max(3.0, row["float_asr"] + 1) and row["efrap_acc"] >= row["float_acc"] - 2


def test_the_config_form_observes_then_writes_each_layers_integers_into_torchaos_tensors(mlp, calib):
    from efrap_torchao import EFRAPQuantizeConfig

    model = copy.deepcopy(mlp)
    config = EFRAPQuantizeConfig(base_config=CONFIGS["intx-int4-g32"](), efrap=FAST)
    torchao_quantize_(model, config)
    assert type(model.up.weight.data) is torch.Tensor  # observing: the float model runs as it was
    with torch.no_grad():
        for batch in calib.split(32):
            model(batch)
    torchao_quantize_(model, config.converting())
    plan = config.plan(model)
    assert list(plan.layers) == ["up", "down", "head"] and plan.meta.config["layer_inputs"] == "float"
    assert plan.meta.calib_size == 128 and verify_quantize(model, plan).integers_ok
    stock = copy.deepcopy(mlp)
    torchao_quantize_(stock, CONFIGS["intx-int4-g32"]())
    assert type(model.up.weight) is type(stock.up.weight)


def test_the_config_form_refuses_what_it_cannot_carry_out(mlp):
    from efrap_torchao import EFRAPQuantizeConfig

    with pytest.raises(EFRAPError, match="budget mode measures the whole model"):
        EFRAPQuantizeConfig(base_config=Int8WeightOnlyConfig(), efrap=EFRAPConfig(budget=1.0))
    with pytest.raises(EFRAPError, match="inputs from the float model only"):
        EFRAPQuantizeConfig(base_config=Int8WeightOnlyConfig(), efrap=EFRAPConfig(layer_inputs="mixed"))
    with pytest.raises(EFRAPError, match="Float8WeightOnlyConfig is not one EFRAP learns"):
        EFRAPQuantizeConfig(base_config=Float8WeightOnlyConfig())
    config = EFRAPQuantizeConfig(base_config=Int8WeightOnlyConfig())
    with pytest.raises(EFRAPError, match="no inputs recorded"):
        torchao_quantize_(copy.deepcopy(mlp), config.converting())
    with pytest.raises(EFRAPError, match="no layer of this model converted yet"):
        config.plan(mlp)
