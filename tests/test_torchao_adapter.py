"""torchao PT2E: a QCB aimed at the X86 grid fires in convert_pt2e's int8 model; EFRAP's integers
come out of the stock PT2E flow bit for bit and remove it."""

from __future__ import annotations

import pytest
import torch

from efrap_plugin import EFRAPError, defend
from efrap_plugin.redteam import evaluate
from efrap_plugin.redteam.models import resnet8
from efrap_torchao import quantize_eager, quantize_pt2e, read_int8_weights, verify_eager, verify_pt2e


@pytest.fixture(scope="module")
def x86_plan(pq_x86, digits):
    return defend(pq_x86.model, digits.train.x, "torchao-x86", progress=False)


def test_stock_pt2e_activates_a_qcb_aimed_at_its_grid(pq_x86, digits):
    float_m = evaluate(pq_x86.model, digits.test, pq_x86.trigger)
    stock = evaluate(quantize_pt2e(pq_x86.model, digits.train.x[:1024]), digits.test, pq_x86.trigger)
    assert float_m.asr <= 0.10 and float_m.clean_acc >= 0.95
    assert stock.asr >= 0.90


def test_defended_pt2e_holds_the_plan_and_removes_the_backdoor(pq_x86, x86_plan, digits):
    plan = x86_plan
    converted = quantize_pt2e(pq_x86.model, digits.train.x[:1024], plan)
    report = verify_pt2e(converted, plan)
    assert report.integers_ok and report.matching == 4
    ints, _ = read_int8_weights(converted)
    assert sorted(ints) == ["classifier", "features.0.0", "features.1.0", "features.3.0"]
    assert all(t.dtype == torch.int32 and int(t.min()) >= -128 and int(t.max()) <= 127 for t in ints.values())
    float_m = evaluate(pq_x86.model, digits.test, pq_x86.trigger)
    defended = evaluate(converted, digits.test, pq_x86.trigger)
    assert defended.asr <= max(0.03, float_m.asr + 0.01)  # no more backdoor than the float model's
    assert defended.clean_acc >= float_m.clean_acc - 0.01


def test_a_plan_for_another_backend_is_refused(pq_x86, digits):
    plan = defend(
        pq_x86.model,
        digits.train.x[:64],
        "onnxruntime",
        config=__import__("efrap_plugin").EFRAPConfig(iters=10),
        progress=False,
    )
    with pytest.raises(EFRAPError, match=r"X86InductorQuantizer needs scheme='torchao-x86'"):
        quantize_pt2e(pq_x86.model, digits.train.x[:64], plan)


def test_legacy_fx_flow_holds_the_plan(clean_cnn, digits):
    """prepare_fx / convert_fx with the x86 QConfigMapping: same grid, same integers after snapping."""
    from efrap_plugin import EFRAPConfig
    from efrap_torchao import quantize_fx, verify_fx

    plan = defend(
        clean_cnn, digits.train.x, "torchao-x86", EFRAPConfig(iters=150, calib_size=256), progress=False
    )
    assert plan.flipped_share > 0.05  # not just nearest rounding
    converted = quantize_fx(clean_cnn, digits.train.x[:256], plan)
    assert verify_fx(converted, plan).matching == 4
    stock = quantize_fx(clean_cnn, digits.train.x[:256])
    assert not verify_fx(stock, plan, strict=False).integers_ok  # stock nearest differs from the plan
    assert evaluate(converted, digits.test).clean_acc >= 0.9


def test_legacy_eager_flow_holds_the_plan_and_removes_the_backdoor(pq_x86, x86_plan, digits):
    """QuantWrapper + fused Conv/Linear-ReLU + prepare/convert with the x86 qconfig: the same grid."""
    stock = quantize_eager(pq_x86.model, digits.train.x[:1024])
    assert evaluate(stock, digits.test, pq_x86.trigger).asr >= 0.90
    assert not verify_eager(stock, x86_plan, strict=False).integers_ok
    converted = quantize_eager(pq_x86.model, digits.train.x[:1024], x86_plan)
    assert verify_eager(converted, x86_plan).matching == 4
    assert (
        type(converted.get_submodule("module.features.0.0")).__name__ == "ConvReLU2d"
    )  # fused, as eager scripts do
    float_m = evaluate(pq_x86.model, digits.test, pq_x86.trigger)
    defended = evaluate(converted, digits.test, pq_x86.trigger)
    assert defended.asr <= max(0.03, float_m.asr + 0.01)
    assert defended.clean_acc >= float_m.clean_acc - 0.01


def test_eager_flow_refuses_plain_residual_adds(digits):
    with pytest.raises(EFRAPError, match=r"FloatFunctional.*quantize_fx / quantize_pt2e"):
        quantize_eager(resnet8(in_channels=1, width=4).eval(), digits.train.x[:8])


def test_eager_flow_keeps_the_models_own_quant_stubs(digits):
    """A model written for eager mode (its own QuantStub / DeQuantStub, no BatchNorm) is used as it is."""
    from torch import nn
    from torch.ao.quantization import DeQuantStub, QuantStub

    from efrap_plugin import EFRAPConfig
    from efrap_plugin.redteam import train

    torch.manual_seed(0)
    model = nn.Sequential(
        QuantStub(), nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10), DeQuantStub()
    )
    train(model, digits.train, epochs=3, progress=False)
    plan = defend(
        model, digits.train.x, "torchao-x86", EFRAPConfig(iters=100, calib_size=256), progress=False
    )
    converted = quantize_eager(model, digits.train.x[:256], plan)
    assert type(converted[0]).__name__ == "Quantize"  # its own stub, converted; no QuantWrapper around it
    assert verify_eager(converted, plan).matching == 2
    assert type(converted[1]).__name__ == "ConvReLU2d"
    assert evaluate(converted, digits.test).clean_acc >= evaluate(model, digits.test).clean_acc - 0.03


def test_graph_run_gives_each_node_the_value_of_a_run_from_the_start():
    """GraphRun (one pass of a PT2E graph, advanced as asked) against torch.fx's Interpreter run from
    the start: every conv input and output equal; a value asked for after its last reader ran is
    recomputed; a weight changed between two requests is read afresh downstream; a value is one tensor,
    held until the run passes its last reader."""
    from efrap_torchao.graph_run import GraphRun

    torch.manual_seed(0)
    model = resnet8(in_channels=1).eval()
    x = torch.rand(40, 1, 8, 8)
    gm = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("b", min=1)},)).module()
    convs = [n for n in gm.graph.nodes if str(n.target) == "aten.conv2d.default"]
    assert len(convs) >= 7

    def from_start(name):
        env = {}

        class Keep(torch.fx.Interpreter):
            def run_node(self, n):
                env[n.name] = out = super().run_node(n)
                return out

        Keep(gm).run(x)
        return env[name]

    run = GraphRun(gm, x, chunk=16)
    for conv in convs:
        assert torch.allclose(run.value(conv.args[0].name), from_start(conv.args[0].name), atol=1e-6)
        assert torch.allclose(run.value(conv.name), from_start(conv.name), atol=1e-6)
    early = convs[1].args[0].name  # long past: dropped, then recomputed from the start
    assert torch.allclose(run.value(early), from_start(early), atol=1e-6)

    run = GraphRun(gm, x, chunk=16)
    run.value(convs[0].args[0].name)
    owner, _, attr = convs[0].args[1].target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    setattr(module, attr, torch.nn.Parameter(torch.zeros_like(getattr(module, attr)), requires_grad=False))
    assert float(run.value(convs[0].name).abs().max()) == float(from_start(convs[0].name).abs().max())
    assert torch.allclose(run.value(convs[-1].name), from_start(convs[-1].name), atol=1e-6)

    # one tensor per value, no copy per request; the caller may write to it once the run lets it go
    run = GraphRun(gm, x, chunk=16)
    only = next(c for c in convs if len(c.args[0].users) == 1 and c.args[0].op != "placeholder")
    value = run.value(only.args[0].name)
    assert run.value(only.args[0].name) is value and run.holds(value)
    run.value(only.name)
    assert not run.holds(value) and run.holds(run.value(only.name)) and run.holds(x[:3])
