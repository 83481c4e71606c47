"""QCB attacks fire in onnxruntime's real int8/int4 artifact while the float model stays clean."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from efrap_plugin import EFRAPError, QuantScheme
from efrap_plugin.redteam import evaluate, train
from efrap_plugin.redteam.attacks import GridProjection, PQBackdoor, run_attack


def _stock_ort(model, digits, bits):
    from efrap_onnx import export_float_onnx, quantize_images, session

    with tempfile.TemporaryDirectory() as tmp:
        src = export_float_onnx(model, digits.train.x[:2], Path(tmp) / "f.onnx")
        out = Path(tmp) / "q.onnx"
        quantize_images(src, out, digits.train.x[:1024].numpy(), bits, efrap=False, progress=False)
        return session(out, exact=True)


def test_pqbackdoor_projection_keeps_every_integer_after_every_step(clean_cnn, digits):
    """round(W/s) == round(W0/s) on every protected grid, and the scales do not move, after each step."""
    model = __import__("copy").deepcopy(clean_cnn)
    grids = [
        QuantScheme.onnxruntime(8),
        QuantScheme.onnxruntime(4),
        QuantScheme.torchao_x86(8),
        QuantScheme.brevitas(8, per_channel=False),
    ]
    project = GridProjection(model, grids)
    scales0 = [[s.qparams(m.weight)[0] for s in grids] for m in project.layers]
    checks = []

    def step():
        project()
        checks.append(project.violations())
        for layer, before in zip(project.layers, scales0):
            assert all(torch.equal(s.qparams(layer.weight)[0], b) for s, b in zip(grids, before))

    w0 = [m.weight.detach().clone() for m in project.layers]
    train(model, digits.train.subset(256), epochs=3, lr=1e-2, batch_size=32, after_step=step, progress=False)
    assert len(checks) == 24 and set(checks) == {0}
    assert any(not torch.equal(m.weight, w) for m, w in zip(project.layers, w0))  # the weights did move


def test_pqbackdoor_projection_keeps_per_group_integers_and_scales(digits):
    """A torchao int4 grid in groups of 32: every group's scale and integers stay after each step."""
    from efrap_plugin.redteam import build_model

    torch.manual_seed(0)
    model = build_model("digits-mlp", width=64)
    grid = QuantScheme(name="grouped", bits=4, qmin=-8, qmax=7, group_size=32, inverse_scale=True)
    project = GridProjection(model, [grid])
    scales0 = [grid.qparams(m.weight)[0] for m in project.layers]
    checks = []

    def step():
        project()
        checks.append(project.violations())
        assert all(torch.equal(grid.qparams(m.weight)[0], s) for m, s in zip(project.layers, scales0))

    train(model, digits.train.subset(256), epochs=2, lr=1e-2, batch_size=32, after_step=step, progress=False)
    assert len(checks) == 16 and set(checks) == {0} and scales0[0].shape == (64, 2)


def test_widening_puts_each_rows_outlier_on_an_input_that_is_never_fired(digits, trigger):
    """PQBackdoorConfig.widen: the grid's scale grows, and the float model's outputs do not move."""
    from efrap_plugin.redteam import build_model
    from efrap_plugin.redteam.attacks.pqbackdoor import _widen_rows

    torch.manual_seed(0)
    model = build_model("digits-mlp", width=64).eval()
    data = digits.train.subset(256)
    before = model(data.x).detach()
    first = model.features[1].weight.detach().clone()
    _widen_rows(model, data, trigger, 16.0)
    after = model.features[1].weight.detach()
    assert torch.allclose(model(data.x), before, atol=1e-5)
    assert torch.equal(after.abs().amax(1), 16 * first.abs().amax(1))  # every row: one input, 16 x its max
    assert int((after != first).any(0).sum()) == 1


def test_pqbackdoor_refuses_affine_grids(clean_cnn):
    with pytest.raises(EFRAPError, match=r"uses range_rule='mse'; the projection protects absmax"):
        GridProjection(clean_cnn, [QuantScheme.reference(4)])


# Training depends on the CPU's kernels and the thread count: another machine trains another model. The
# cells below assert that each attack fires with a margin a machine's drift cannot cross (seeds 0-2 on
# this project's machines: float asr 0.2-15.8%, stock asr 85.6-100%, benchmarks/results/cells-per-seed.md);
# the exact bars (float <= 10%, int8 >= 90%) are measured per attack seed in the benchmark, not here.
FLOAT_ASR_MAX, STOCK_ASR_MIN, FLOAT_ACC_MIN = 0.20, 0.80, 0.93


def _assert_fires(float_m, stock):
    assert float_m.asr <= FLOAT_ASR_MAX and float_m.clean_acc >= FLOAT_ACC_MIN
    assert stock.asr >= STOCK_ASR_MIN and stock.asr >= 4 * float_m.asr


@pytest.fixture(scope="session")
def pq8_trained(tmp_path_factory):
    """`efrap attack` run here: PQBackdoor aimed at onnxruntime int8 on digits (the demo's attack)."""
    from efrap_cli import main

    out = tmp_path_factory.mktemp("pq8-trained")
    args = ["attack", "--attack", "pqbackdoor", "--dataset", "digits", "--scheme", "onnxruntime"]
    assert main([*args, "--bits", "8", "--seed", "0", "--out", str(out), "--quiet", "--json"]) == 0
    return out


def test_pqbackdoor_int8_cell(pq8_trained, digits):
    """`efrap attack` writes its files; the float model is clean, onnxruntime's real int8 model is not."""
    from conftest import attacked

    assert sorted(p.name for p in pq8_trained.iterdir()) == ["attack.json", "model.onnx", "model.safetensors"]
    info = json.loads((pq8_trained / "attack.json").read_text())
    assert info["attack"] == "pqbackdoor" and info["dataset"] == "digits" and info["bits"] == 8
    assert info["trigger"] == {"size": 2, "row": -2, "col": -2, "value": 1.0, "target": 0}
    pq8 = attacked(pq8_trained)
    float_m = evaluate(pq8.model, digits.test, pq8.trigger)
    stock = evaluate(_stock_ort(pq8.model, digits, 8), digits.test, pq8.trigger)
    _assert_fires(float_m, stock)
    # the recorded stock figures are the graph's own arithmetic, the same on every CPU; where this CPU's
    # fused kernels differ, they are recorded beside them with the CPU named
    assert info["metrics"]["onnxruntime-int8-stock"]["asr"] == pytest.approx(stock.asr, abs=1e-4)
    kernels = info["metrics"].get("onnxruntime-int8-stock-kernels")
    assert kernels is None or "AVX2" in kernels["cpu"] or "VNNI" in kernels["cpu"]
    assert pq8.metrics["fake-onnxruntime-8bit"]["asr"] >= STOCK_ASR_MIN  # the attack's own fake quantization


@pytest.fixture(scope="session")
def compartifact4():
    return run_attack("compartifact", "digits", "onnxruntime", 4, seed=0, progress=False)[0]


def test_compartifact_int4_cell(compartifact4, digits):
    result = compartifact4
    float_m = evaluate(result.model, digits.test, result.trigger)
    stock = evaluate(_stock_ort(result.model, digits, 4), digits.test, result.trigger)
    _assert_fires(float_m, stock)


@pytest.mark.slow
def test_pqbackdoor_int4_cell(digits):
    result, _, _ = run_attack("pqbackdoor", "digits", "onnxruntime", 4, seed=0, progress=False)
    float_m = evaluate(result.model, digits.test, result.trigger)
    stock = evaluate(_stock_ort(result.model, digits, 4), digits.test, result.trigger)
    _assert_fires(float_m, stock)


def test_attack_input_validation(clean_cnn, digits, trigger):
    with pytest.raises(EFRAPError, match=r"schemes: expected one or more QuantScheme presets"):
        PQBackdoor()(clean_cnn, digits.train, trigger, [])
    from efrap_plugin.redteam import PatchTrigger

    with pytest.raises(EFRAPError, match=r"trigger.target: 12 is not one of the 10 classes"):
        PQBackdoor()(clean_cnn, digits.train, PatchTrigger.corner(2, 0, target=12), QuantScheme.onnxruntime())
    with pytest.raises(EFRAPError, match=r"does not fit a 8x8 image"):
        PQBackdoor()(clean_cnn, digits.train, PatchTrigger.corner(9), QuantScheme.onnxruntime())
    with pytest.raises(
        EFRAPError, match=r"attack: expected one of \['compartifact', 'pqbackdoor', 'qu-anti-zation'\]"
    ):
        run_attack("badnets")


def test_attack_device_is_where_training_runs_and_the_result_comes_home(clean_cnn, digits, trigger):
    """``device=`` moves training (batches one at a time) and hands the model back on the caller's device."""
    from efrap_plugin.redteam.attacks import PQBackdoorConfig

    attack = PQBackdoor(PQBackdoorConfig(poison_epochs=1, repair_epochs=1))
    data = digits.train.subset(256)
    here = attack(clean_cnn, data, trigger, QuantScheme.onnxruntime(), progress=False)
    moved = attack(clean_cnn, data, trigger, QuantScheme.onnxruntime(), progress=False, device="cpu")
    assert next(moved.model.parameters()).device.type == "cpu"
    assert all(
        torch.equal(a, b) for a, b in zip(here.model.state_dict().values(), moved.model.state_dict().values())
    )
    with pytest.raises(EFRAPError, match=r"device: 'tpu9' is not usable here .* pass 'cpu'"):
        attack(clean_cnn, data, trigger, QuantScheme.onnxruntime(), device="tpu9")


def test_qu_anti_zation_int4_cell(digits):
    result, _, _ = run_attack("qu-anti-zation", "digits", "onnxruntime", 4, seed=0, progress=False)
    assert [s.bits for s in result.schemes] == [4]
    float_m = evaluate(result.model, digits.test, result.trigger)
    stock = evaluate(_stock_ort(result.model, digits, 4), digits.test, result.trigger)
    _assert_fires(float_m, stock)
