"""EFRAP inside the user's own PyTorch AO flow: their quantizer / QConfigMapping / qconfig, their
prepare, calibration and convert, and one `defend_prepared` call between calibration and convert.

The grid comes from the user's observers; integers are read back from the converted int8 model.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from example_runs import ROOT, assert_defended, assert_example_takes_the_config, run_example
from torch import nn

from efrap_plugin import EFRAPConfig, EFRAPError, ModelError
from efrap_torchao import defend_prepared, verify_fx, verify_pt2e

FAST = EFRAPConfig(iters=20, calib_size=128)
sys.path.insert(0, str(ROOT / "examples"))


class Zoo(nn.Module):
    """BatchNorm, a residual add, a depthwise conv, a ConvTranspose and a Linear over 3-D input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 3, padding=1)
        self.tokens = nn.Linear(4, 6)
        self.head = nn.Linear(6 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + torch.relu(self.depthwise(x))
        t = torch.relu(self.tokens(self.up(x).flatten(2).transpose(1, 2)))
        return self.head(t.flatten(1))


@pytest.fixture(scope="module")
def zoo():
    torch.manual_seed(0)
    model = Zoo().eval()
    with torch.no_grad():  # BatchNorm statistics that folding really changes
        model.stem[1].running_mean.uniform_(-0.5, 0.5)
        model.stem[1].running_var.uniform_(0.5, 2.0)
    return model


def _pt2e(model, quantizer, calib):
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    exported = torch.export.export(
        model, (calib[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    prepared = prepare_pt2e(exported.module(), quantizer)
    for batch in calib.split(64):
        prepared(batch)
    return prepared


@pytest.mark.parametrize("name", ["x86", "x86-per-tensor", "xnnpack", "xnnpack-per-tensor"])
def test_pt2e_every_quantizer_and_granularity_holds_the_plan(zoo, digits, name):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
    from torchao_pt2e import make_quantizer

    calib = digits.train.x[:128]
    before = copy.deepcopy(zoo.state_dict())
    prepared = _pt2e(zoo, make_quantizer(name)[0], calib)
    plan = defend_prepared(prepared, calib, FAST, progress=False)
    assert list(plan.layers) == ["stem.0", "depthwise", "tokens", "head"]
    assert plan.scheme.per_channel == (not name.endswith("per-tensor"))
    assert (plan.scheme.qmin, plan.scheme.qmax) == ((-128, 127) if name.startswith("x86") else (-127, 127))
    report = verify_pt2e(convert_pt2e(prepared), plan)
    assert report.integers_ok and report.matching == 4 and report.unplanned == []
    assert all(torch.equal(before[k], v) for k, v in zoo.state_dict().items())  # the user's model untouched


class RowConv(nn.Module):
    """A Conv1d over image rows, then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.rows(x.reshape(x.shape[0], 8, 8))).flatten(1))


@pytest.mark.parametrize("name", ["x86", "xnnpack", "xnnpack-per-tensor"])
def test_pt2e_conv1d_is_defended_where_the_quantizer_quantizes_it(digits, name):
    """XNNPACK quantizes Conv1d; X86Inductor leaves it in float, so there is nothing to defend there."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
    from torchao_pt2e import make_quantizer

    torch.manual_seed(0)
    calib = digits.train.x[:128]
    prepared = _pt2e(RowConv().eval(), make_quantizer(name)[0], calib)
    plan = defend_prepared(prepared, calib, FAST, progress=False)
    assert list(plan.layers) == (["head"] if name == "x86" else ["rows", "head"])
    report = verify_pt2e(convert_pt2e(prepared), plan)
    assert report.integers_ok and report.unplanned == []


class Upsampler(nn.Module):
    """A strided Conv down, a ConvTranspose (output padding) back up with a BatchNorm that prepare_pt2e
    folds into it, each followed by a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)
        self.norm = nn.BatchNorm2d(2)
        self.head = nn.Linear(2 * 64, 10)
        with torch.no_grad():  # statistics that folding really changes
            self.norm.running_mean.uniform_(-0.5, 0.5)
            self.norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.up(torch.relu(self.down(x))))).flatten(1))


@pytest.mark.parametrize("name", ["x86", "xnnpack", "xnnpack-per-tensor"])
def test_pt2e_conv_transpose_is_defended_where_the_quantizer_quantizes_it(digits, name):
    """XNNPACK quantizes a ConvTranspose followed by a ReLU (per channel along its axis 0, its input
    channels, or per tensor); X86Inductor leaves it in float. Where quantized it is learned in the
    graph's own function (each layer's rounding error with nearest integers is the weight grid's, not a
    wrong function's) and its integers are read back from the converted model in its own layout."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
    from torchao_pt2e import make_quantizer

    torch.manual_seed(0)
    calib = digits.train.x[:128]
    model = Upsampler().eval()
    prepared = _pt2e(model, make_quantizer(name)[0], calib)
    plan = defend_prepared(prepared, calib, FAST, progress=False)
    assert list(plan.layers) == (["down", "head"] if name == "x86" else ["down", "up", "head"])
    assert all(lp.stats["act_error_nearest"] < 1e-2 for lp in plan.layers.values())
    if name != "x86":
        assert plan["up"].integers.shape == model.up.weight.shape and plan["up"].flipped_share > 0
        assert plan["up"].scale.numel() == (1 if name.endswith("per-tensor") else 4)
    converted = convert_pt2e(prepared)
    report = verify_pt2e(converted, plan)
    assert report.integers_ok and report.matching == len(plan.layers) and report.unplanned == []
    x = digits.test.x[:256]
    with torch.no_grad():  # the converted model still computes the float model's decisions
        assert (converted(x).argmax(1) == model(x).argmax(1)).float().mean() >= 0.95


@pytest.mark.parametrize("qconfig", ["x86", "fbgemm", "qnnpack"])
def test_fx_every_qconfig_holds_the_plan_conv_transpose_included(zoo, digits, qconfig):
    """Each default QConfigMapping quantizes the ConvTranspose too (per tensor: torch.ao has no per-channel
    ConvTranspose kernel): it is learned like the other layers and read back from the converted model."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    calib = digits.train.x[:128]
    prepared = prepare_fx(copy.deepcopy(zoo), get_default_qconfig_mapping(qconfig), (calib[:2],))
    for batch in calib.split(64):
        prepared(batch)
    plan = defend_prepared(prepared, calib, FAST, progress=False)
    assert list(plan.layers) == ["stem.0", "depthwise", "up", "tokens", "head"] and plan.meta.skipped == {}
    assert plan["up"].integers.shape == zoo.up.weight.shape and plan["up"].flipped_share > 0
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = qconfig  # the kernels the user's qconfig targets
        report = verify_fx(convert_fx(prepared), plan)
    finally:
        torch.backends.quantized.engine = engine
    assert report.integers_ok and report.matching == 5 and report.skipped == [] and report.unplanned == []


def test_a_prepared_model_with_nothing_quantized_is_refused(digits):
    with pytest.raises(ModelError, match=r"no Conv / Linear weight with an observer in Sequential"):
        defend_prepared(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), digits.train.x[:8])
    with pytest.raises(
        EFRAPError, match=r"layer_inputs: expected 'quantized', 'float' or 'mixed', got 'fp32'"
    ):
        defend_prepared(
            nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), digits.train.x[:8], layer_inputs="fp32"
        )


def test_an_affine_weight_observer_is_refused_naming_the_layer(digits):
    from torch.ao.quantization import MinMaxObserver, QConfig, QConfigMapping, default_observer
    from torch.ao.quantization.quantize_fx import prepare_fx

    affine = QConfig(activation=default_observer, weight=MinMaxObserver.with_args(dtype=torch.qint8))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    prepared = prepare_fx(model, QConfigMapping().set_global(affine), (digits.train.x[:2],))
    prepared(digits.train.x[:8])
    with pytest.raises(
        EFRAPError, match=r"layer '1': weight observer MinMaxObserver uses torch.per_tensor_affine"
    ):
        defend_prepared(prepared, digits.train.x[:8], FAST, progress=False)


@pytest.mark.parametrize(
    "quantizer, fixture, route",
    [
        ("x86", "pqbackdoor-x86", "flag"),
        ("xnnpack", "pqbackdoor-ort8", "flag"),
        ("x86-per-tensor", "pqbackdoor-x86-per-tensor", "flag"),
        pytest.param("xnnpack-per-tensor", "pqbackdoor-xnnpack-per-tensor", "flag", marks=pytest.mark.slow),
    ],
)
def test_pt2e_example_removes_a_qcb_aimed_at_its_quantizer(quantizer, fixture, route):
    """XNNPACK per channel rounds to onnxruntime's int8 grid ([-127, 127], max|w| / 127): same attack.
    The flag (the quantizer wrapped) and the call give the same integers (test_torchao_flag)."""
    row = run_example(
        "torchao_pt2e.py", "--quantizer", quantizer, "--model", f"tests/fixtures/{fixture}", "--route", route
    )
    assert_defended(row)
    assert row["route"] == route
    assert (
        abs(row["ort_efrap_asr"] - row["efrap_asr"]) <= 1
        and abs(row["ort_efrap_acc"] - row["efrap_acc"]) <= 1
    )
    assert row["kernels_ok"] or "no VNNI" in row["cpu"]  # a CPU with VNNI computes the graph


def test_pt2e_example_in_budget_mode_removes_the_qcb():
    """Budget mode through the user's own PT2E flow (defend_prepared between calibration and convert):
    the held-out images run the prepared model."""
    row = run_example(
        "torchao_pt2e.py",
        "--quantizer",
        "x86-per-tensor",
        "--model",
        "tests/fixtures/pqbackdoor-x86-per-tensor",
        "--budget",
        "1",
        "--route",
        "call",
    )
    assert_defended(row)
    assert abs(row["ort_efrap_asr"] - row["efrap_asr"]) <= 1


@pytest.mark.parametrize(
    "qconfig, fixture",
    [
        ("x86", "pqbackdoor-x86"),
        # qnnpack weights: per tensor, [-128, 127], max|w| / 127.5, the x86-per-tensor PT2E grid
        pytest.param("qnnpack", "pqbackdoor-x86-per-tensor", marks=pytest.mark.slow),
    ],
)
def test_fx_example_removes_a_qcb_aimed_at_its_qconfig(qconfig, fixture):
    assert_defended(
        run_example("torch_ao_fx.py", "--qconfig", qconfig, "--model", f"tests/fixtures/{fixture}")
    )


@pytest.mark.parametrize(
    "script, args",
    [
        ("torchao_pt2e.py", ("--quantizer", "x86", "--model", "tests/fixtures/pqbackdoor-x86")),
        ("torch_ao_fx.py", ("--qconfig", "x86", "--model", "tests/fixtures/pqbackdoor-x86")),
    ],
)
def test_flow_examples_defend_with_the_config_given_as_json(script, args):
    """benchmarks/flows.py tries settings through --efrap: it must reach defend_prepared."""
    assert_example_takes_the_config(script, *args)


@pytest.mark.slow
def test_eager_example_removes_a_qcb_aimed_at_its_qconfig():
    """Trains the tutorial model and plants the attack (about a minute on 2 cores)."""
    assert_defended(run_example("torch_ao_eager.py"))


def test_an_exported_model_is_pointed_to_the_pt2e_flow(pq_x86, digits):
    """The one-call API learns on modules; an ExportedProgram (or its .module()) goes through
    defend_prepared after the user's own prepare_pt2e, which takes it as it is."""
    from efrap_plugin import defend

    exported = torch.export.export(pq_x86.model.eval(), (digits.train.x[:2],))
    for held in (exported, exported.module()):
        with pytest.raises(
            ModelError, match=r"an exported graph \(torch.export\).*defend_prepared\(prepare_pt2e"
        ):
            defend(held, digits.train.x[:64], "torchao-x86", FAST, progress=False)


class _EagerTokens(nn.Module):
    """The eager-mode recipe for embeddings: float_qparams_weight_only_qconfig on the table, a quantized
    Linear behind a QuantStub."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.quant, self.dequant = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()
        self.fc = nn.Linear(16, 4)

    def forward(self, ids):
        return self.dequant(self.fc(self.quant(self.emb(ids).mean(1))))


def test_eager_quantized_embedding_is_named_and_read_back_from_the_converted_model():
    """Token ids calibrate as they are; the Embedding's quantized table (per-channel float qparams) is
    named with the reason, read back by verify_eager instead of crashing it, and a plan that does not list
    it fails."""
    import dataclasses

    from torch.ao.quantization import convert, float_qparams_weight_only_qconfig, get_default_qconfig, prepare

    from efrap_plugin import PlanMismatchError
    from efrap_torchao import verify_eager

    torch.manual_seed(0)
    model = _EagerTokens().eval()
    model.qconfig = get_default_qconfig("x86")
    model.emb.qconfig = float_qparams_weight_only_qconfig
    prepared = prepare(model)
    ids = torch.randint(0, 50, (128, 5))
    prepared(ids)
    plan = defend_prepared(prepared, ids, config=EFRAPConfig(iters=20), progress=False)
    assert list(plan.layers) == ["fc"]
    assert plan.meta.skipped == {
        "emb": "Embedding: not a Conv / Linear layer EFRAP learns; left at nearest rounding"
    }
    converted = convert(prepared)
    report = verify_eager(converted, plan)
    assert report.integers_ok and report.skipped == ["emb"]
    with pytest.raises(PlanMismatchError, match=r"quantized layers the plan lacks \['emb'\]"):
        verify_eager(converted, dataclasses.replace(plan, meta=plan.meta.replace(skipped={})))


def test_a_module_called_twice_is_defended_once_and_said_so(caplog):
    """PT2E of a model that calls one Linear twice (tied weights): the converted model holds one set of
    integers, the plan's, and the user is told it was learned for the last call."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.out(self.fc(torch.relu(self.fc(x))))

    torch.manual_seed(0)
    x = torch.randn(128, 16)
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    exported = torch.export.export(
        Twice().eval(), (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    ).module()
    prepared = prepare_pt2e(exported, quantizer)
    prepared(x)
    with caplog.at_level("WARNING"):
        plan = defend_prepared(prepared, x, config=EFRAPConfig(iters=20), progress=False)
    assert "fc: one weight read by 2 layers" in caplog.text
    assert sorted(plan.layers) == ["fc", "out"]
    report = verify_pt2e(convert_pt2e(prepared), plan)
    assert report.integers_ok and report.matching == 2
