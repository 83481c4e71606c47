"""The adapter contract: every route is a producer for one skeleton (``efrap_plugin.run``); the config's
choices are carried out or refused with the reason; the plan's metadata is typed and round-trips."""

from __future__ import annotations

import contextlib
import json
import logging

import pytest
import torch
from torch import nn

from efrap_plugin import (
    EFRAPConfig,
    EFRAPError,
    FoundLayers,
    HeldOut,
    Honours,
    LayerProblem,
    PlanMeta,
    ProducedPlan,
    QuantScheme,
    RoundingPlan,
    defend,
    first_outputs,
    resolve_config,
    run,
    take_rows,
)

FAST = EFRAPConfig(iters=40, calib_size=128)


class LinearProducer:
    """A route written outside the core, as a user would write one: the Linear layers of a plain
    torch model, rounded on an int8 per-channel grid, installed in a copy that plays the quantized model."""

    source = "torch"
    flow = "linear-example"
    honours = Honours(layer_inputs=("quantized",), units=("layer",), why_not={"unit": "no ReLU is modelled"})

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.quantized = None
        self.scheme = QuantScheme.onnxruntime()

    def running(self):
        return contextlib.nullcontext()

    def calibration(self, data, rows):
        return data[:rows]

    def rows(self, calib):
        return calib.shape[0]

    def take(self, calib, idx):
        return take_rows(calib, idx)

    def find_layers(self, calib, config):
        names = [n for n, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        return FoundLayers(names, {"norm": "a LayerNorm: not rounded here"})

    def float_outputs(self, calib):
        return first_outputs(self.model, calib)

    def problems(self, calib, config):
        import copy

        self.quantized = copy.deepcopy(self.model)
        for name in [n for n, m in self.model.named_modules() if isinstance(m, nn.Linear)]:
            layer, q_layer = self.model.get_submodule(name), self.quantized.get_submodule(name)
            inputs = _capture(self.quantized, q_layer, calib)
            targets = _capture(self.model, layer, calib, output=True)
            weight = layer.weight.detach().clone()
            scale, zero_point = self.scheme.qparams(weight)

            def install(integers, q_layer=q_layer, scale=scale, zero_point=zero_point):
                with torch.no_grad():
                    q_layer.weight.copy_(self.scheme.dequantize(integers, scale, zero_point))

            bias = layer.bias.detach()
            forward = lambda x, w, b=bias: torch.nn.functional.linear(x, w, b)  # noqa: E731
            yield LayerProblem(
                name, weight, self.scheme, forward, inputs, targets, scale, zero_point, install
            )

    def held_out(self, held):
        return HeldOut.of_models(self.model, self.quantized, held)

    def finish(self, learned):
        return ProducedPlan(self.scheme, learned)


def _capture(model, layer, x, output=False):
    got = []
    hook = (
        layer.register_forward_hook(lambda _m, _i, out: got.append(out.detach()))
        if output
        else layer.register_forward_pre_hook(lambda _m, inp: got.append(inp[0].detach()))
    )
    with torch.no_grad():
        model(x)
    hook.remove()
    return got[0]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 4))


def test_a_route_written_outside_the_core_runs_through_the_one_skeleton(caplog):
    model, calib = _mlp(), torch.randn(400, 16)
    with caplog.at_level(logging.WARNING):
        plan = run(LinearProducer(model), calib, FAST, progress=False)
    assert list(plan.layers) == ["0", "2", "4"]
    assert plan.meta.flow == "linear-example" and plan.meta.calib_size == 128
    assert (
        plan.meta.skipped == {"norm": "a LayerNorm: not rounded here"} and "norm: a LayerNorm" in caplog.text
    )
    assert plan.meta.config["unit"] == "layer" and plan.meta.config["layer_inputs"] == "quantized"
    for name, lp in plan.layers.items():  # each layer's integers on its grid, some rounded off nearest
        assert (
            int(lp.integers.abs().max()) <= 127
            and lp.integers.shape == model.get_submodule(name).weight.shape
        )
    assert plan.flipped_share > 0
    # budget mode runs the producer's own held-out measurement
    ladder = run(
        LinearProducer(model),
        calib,
        EFRAPConfig(iters=40, calib_size=128, budget=2.0, holdout=64),
        progress=False,
    )
    assert ladder.disagreement is not None and ladder.meta.calib_size == 128


def test_a_choice_the_route_cannot_carry_out_is_refused_with_its_reason():
    producer = LinearProducer(_mlp())
    with pytest.raises(EFRAPError, match=r"unit='activation'.*carries out 'layer' \(no ReLU is modelled\)"):
        resolve_config(producer, EFRAPConfig(unit="activation"))
    with pytest.raises(
        EFRAPError, match=r"layer_inputs='mixed'.*set layer_inputs='quantized' or leave it None"
    ):
        run(producer, torch.randn(64, 16), EFRAPConfig(layer_inputs="mixed"))
    assert resolve_config(producer, None).unit == "layer"


def test_defend_honours_every_layer_inputs_choice_and_records_it(clean_cnn, calib):
    plans = {
        choice: defend(clean_cnn, calib, "onnxruntime", FAST.replace(layer_inputs=choice), progress=False)
        for choice in (None, "quantized", "float", "mixed")
    }
    assert plans[None].meta.config["layer_inputs"] == "quantized"  # the route's own
    assert plans["float"].meta.config["layer_inputs"] == "float"
    same = {
        choice: all(torch.equal(lp.integers, plans["quantized"][n].integers) for n, lp in plan.layers.items())
        for choice, plan in plans.items()
    }
    assert same[None] and not same["float"] and not same["mixed"]


def test_brevitas_refuses_the_activation_unit_and_onnxruntime_the_float_inputs(pq8_onnx, calib, tmp_path):
    from brevitas.nn import QuantLinear

    from efrap_brevitas import defend_quant_model
    from efrap_onnx import ListDataReader, quantize_static

    model = nn.Sequential(nn.Flatten(), QuantLinear(64, 10, bias=True))
    with pytest.raises(
        EFRAPError, match=r"unit='activation': the brevitas route carries out 'layer' \(a Brevitas"
    ):
        defend_quant_model(model, calib, EFRAPConfig(unit="activation"))
    with pytest.raises(EFRAPError, match=r"layer_inputs='float' and config.layer_inputs='mixed' disagree"):
        defend_quant_model(model, calib, EFRAPConfig(layer_inputs="mixed"), layer_inputs="float")
    import onnx

    reader = ListDataReader.from_array(onnx.load(str(pq8_onnx)).graph.input[0].name, calib[:64])
    out = tmp_path / "q.onnx"
    with pytest.raises(
        EFRAPError, match=r"layer_inputs='mixed': the onnxruntime route .* from the QDQ graph"
    ):
        quantize_static(pq8_onnx, out, reader, config=EFRAPConfig(layer_inputs="mixed"), progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # refused: nothing written


def test_the_plan_metadata_is_typed_and_round_trips(clean_cnn, calib, tmp_path):
    plan = defend(clean_cnn, calib, "onnxruntime", FAST, progress=False)
    with pytest.raises(AttributeError):
        plan.meta.skiped  # noqa: B018  a misspelt entry is an error, not an empty dict
    loaded = RoundingPlan.load(plan.save(tmp_path / "p.safetensors"))
    assert loaded.meta == plan.meta and isinstance(loaded.meta, PlanMeta)
    # a file of an earlier version: layer_inputs / unit beside the config, an entry this version lacks
    old = PlanMeta.from_dict(
        {"config": {"iters": 5}, "layer_inputs": "mixed", "unit": "layer", "note": "kept"}
    )
    assert old.layer_inputs == "mixed" and old.unit == "layer" and old.extra == {"note": "kept"}
    assert json.loads(json.dumps(old.to_dict()))["note"] == "kept"
    with pytest.raises(ValueError, match="meta entry 'skipped' is list"):
        PlanMeta.from_dict({"skipped": ["a"]})


def test_budget_fields_without_a_budget_are_refused_in_one_place():
    with pytest.raises(EFRAPError, match=r"holdout \(--holdout\) sets the images budget mode measures on"):
        EFRAPConfig(holdout=512)
    with pytest.raises(EFRAPError, match=r"^--holdout-choice picks .* give --budget PCT with it"):
        EFRAPConfig.from_flags({"holdout_choice": "boundary"})  # given, even at its default value
    assert EFRAPConfig.from_flags({"budget": 1.0, "holdout": 512}).holdout == 512


def test_a_defense_called_inside_the_users_no_grad_block_learns_the_same_plan(clean_cnn, calib):
    """Users write calibration loops under torch.no_grad(); a defense called there still optimises."""
    outside = defend(clean_cnn, calib, "onnxruntime", FAST, progress=False)
    with torch.no_grad():
        inside = defend(clean_cnn, calib, "onnxruntime", FAST, progress=False)
    assert inside.flipped_share > 0
    assert all(torch.equal(lp.integers, outside[n].integers) for n, lp in inside.layers.items())
