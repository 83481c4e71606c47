"""Budget mode: each layer keeps the strongest flipping whose held-out top-1 disagreement with the float
model stays within its share of the user's budget. The disagreement the plan reports is checked against
the real artifact (onnxruntime session, Brevitas model), and the defended models against the removal bar."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from efrap_cli.main import main
from efrap_onnx import quantize_images, session, verify
from efrap_plugin import DataError, EFRAPConfig, EFRAPError, HeldOut, defend
from efrap_plugin.held_out import first_outputs, held_out_indices, split_sizes, take_rows
from efrap_plugin.redteam import evaluate
from efrap_plugin.rounding import BUDGET_STRENGTHS, budget_strengths

BUDGET = EFRAPConfig(budget=1.0)


def _logits(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_the_budget_is_a_percentage_of_the_full_objective_and_the_default():
    with pytest.raises(EFRAPError, match=r"budget \(--budget\): expected a percentage in \[0, 100\]"):
        EFRAPConfig(budget=150)
    with pytest.raises(EFRAPError, match=r"objective='preserve_only' has none to search. Set budget=None"):
        EFRAPConfig(budget=0.5, objective="preserve_only")
    with pytest.raises(EFRAPError, match=r"flip_weight \(--flip-weight\): the one fixed flipping strength"):
        EFRAPConfig(budget=0.5, flip_weight=2.0)
    assert (EFRAPConfig().budget, EFRAPConfig().max_strength, EFRAPConfig().margin_cap) == (None, 0.5, None)
    assert EFRAPConfig.reference().budget is None
    assert EFRAPConfig(budget=None, flip_weight=2.0, objective="flip_only").flip_weight == 2.0


def test_the_margin_cap_is_a_percentage_of_budget_mode():
    for bad in (-1, 101, "4"):
        with pytest.raises(
            EFRAPError, match=r"margin_cap \(--margin-cap\): expected a percentage in \[0, 100\]"
        ):
            EFRAPConfig(budget=1.0, margin_cap=bad)
    with pytest.raises(EFRAPError, match=r"caps budget mode's ladder, and budget is None"):
        EFRAPConfig(budget=None, margin_cap=2.0)
    assert EFRAPConfig().margin_cap is None


def test_margin_risk_counts_inputs_whose_float_class_lost_half_its_margin():
    reference = torch.tensor([[4.0, 0.0, 1.0], [0.0, 2.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    # margins 3, 1, 1, 3 -> 1.4 (halved), 0.9 (kept), -1 (lost: another class wins), 3 (kept)
    outputs = torch.tensor([[2.4, 0.0, 1.0], [0.0, 1.9, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    seen = HeldOut(reference, lambda: outputs).measure()
    assert seen.disagreement == 25.0 and seen.margin_risk == 50.0
    assert HeldOut(reference, lambda r=reference: r).measure() == (0.0, 0.0)
    with pytest.raises(DataError, match=r"outputs \(4, 2\) do not match the float model's \(4, 3\)"):
        HeldOut(reference, lambda: outputs[:, :2]).measure()


def test_the_ladder_climbs_by_tenths_to_its_top():
    assert budget_strengths(EFRAPConfig(budget=1.0, max_strength=0.5)) == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    assert budget_strengths(EFRAPConfig(budget=0.5, max_strength=0.8))[-3:] == (0.6, 0.7, 0.8)
    assert BUDGET_STRENGTHS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    assert budget_strengths(EFRAPConfig(budget=1.0, max_strength=0.35)) == (0.0, 0.1, 0.2, 0.3, 0.35)
    assert budget_strengths(EFRAPConfig(budget=1.0, max_strength=0.05)) == (0.0, 0.05)
    for bad in (0, 1.5, True, "0.8"):
        with pytest.raises(
            EFRAPError, match=r"max_strength \(--max-strength\): expected a share in \(0, 1\]"
        ):
            EFRAPConfig(budget=1.0, max_strength=bad)
    with pytest.raises(EFRAPError, match=r"tops budget mode's ladder, and budget is None"):
        EFRAPConfig(budget=None, max_strength=0.8)


def test_the_held_out_inputs_are_those_asked_for_or_a_quarter_of_a_short_supply():
    assert split_sizes(1257, BUDGET) == (1001, 256)
    assert split_sizes(1024, BUDGET) == (768, 256)
    assert split_sizes(200, BUDGET) == (150, 50)
    assert split_sizes(5000, BUDGET) == (1024, 256)
    with pytest.raises(
        DataError, match=r"holdout \(--holdout\): budget mode measures on at least 16 held-out"
    ):
        split_sizes(5000, BUDGET.replace(holdout=8))  # the setting is the problem, not the data
    more = BUDGET.replace(holdout=1024)  # asked for, and supplied: held out whole
    assert split_sizes(2048, more) == (1024, 1024) and split_sizes(1500, more) == (1024, 375)
    assert split_sizes(1257, EFRAPConfig(budget=None)) == (1024, 0)
    with pytest.raises(DataError, match=r"40 inputs leave 10; give at least 64 inputs, or set budget=None"):
        split_sizes(40, BUDGET)


def test_the_held_out_inputs_are_those_nearest_the_float_models_decision_boundaries():
    # margins (class score over the best other): 3, 0.5, 2, 0.1, 1, 4, 0.2, 5
    top = torch.tensor([3.0, 0.5, 2.0, 0.1, 1.0, 4.0, 0.2, 5.0])
    outputs = torch.stack([top, torch.zeros(8), torch.zeros(8)], dim=1)
    config = EFRAPConfig(budget=1.0, calib_size=4, holdout=16)
    fit, held = held_out_indices(64, config, lambda: outputs.repeat(8, 1))
    assert held.tolist() == sorted(i + 8 * k for i in (3, 6) for k in range(8))  # margins 0.1 and 0.2
    assert fit.tolist() == [0, 1, 2, 4]  # the optimisation's: the first of the others
    last = held_out_indices(64, config.replace(holdout_choice="last"), None)
    assert last[1].tolist() == list(range(48, 64)) and last[0].tolist() == [0, 1, 2, 3]
    # a token model's N*T rows: an input counts by its lowest position's margin
    tokens = torch.tensor([[5.0, 0.0], [4.0, 0.0], [0.3, 0.0], [6.0, 0.0]] * 16)  # 32 inputs x 2 positions
    assert held_out_indices(32, config.replace(holdout=16), lambda: tokens)[1].tolist() == list(
        range(1, 32, 2)
    )
    inputs = torch.arange(64.0).unsqueeze(1)
    float_model = lambda x: outputs.repeat(8, 1)[x.squeeze(1).long()]  # noqa: E731
    fit_x, held_x = (
        take_rows(inputs, idx)
        for idx in held_out_indices(len(inputs), config, lambda: first_outputs(float_model, inputs))
    )
    assert torch.equal(held_x.squeeze(1).long(), held) and torch.equal(fit_x.squeeze(1).long(), fit)
    with pytest.raises(
        EFRAPError,
        match=r"picks the held-out inputs by the float model's output .* set holdout_choice='last'",
    ):
        held_out_indices(len(inputs), config)
    with pytest.raises(
        EFRAPError, match=r"holdout_choice \(--holdout-choice\): expected one of \('boundary', 'last'\)"
    ):
        EFRAPConfig(budget=1.0, holdout_choice="random")
    assert EFRAPConfig().holdout_choice == "boundary"


def _boundary(float_logits: torch.Tensor, config: EFRAPConfig) -> torch.Tensor:
    """The held-out inputs' indices budget mode measures on, from the float model's logits."""
    return held_out_indices(len(float_logits), config, lambda: float_logits)[1]


def test_onnx_budget_mode_removes_the_backdoor_and_reports_the_artifacts_disagreement(
    pq8, pq8_onnx, digits, tmp_path
):
    calib = np.ascontiguousarray(digits.train.x.numpy())
    out = tmp_path / "efrap.onnx"
    plan = quantize_images(pq8_onnx, out, calib, 8, config=BUDGET, progress=False)
    assert verify(out, plan).integers_ok
    assert all(lp.stats["strength"] in BUDGET_STRENGTHS for lp in plan.layers.values())
    # the held-out images are the 256 nearest the float model's boundaries; the artifact shows what the plan says
    held = calib[_boundary(torch.from_numpy(_logits(session(pq8_onnx), calib)), BUDGET).numpy()]
    logits = [torch.from_numpy(_logits(session(m, exact=True), held)) for m in (pq8_onnx, out)]
    measured = HeldOut(logits[0], lambda: logits[1]).measure()
    assert abs(measured.disagreement - plan.disagreement) <= 100 / 256 + 1e-6  # folding may move one tie
    assert abs(measured.margin_risk - plan.margin_risk) <= 100 / 256 + 1e-6
    float_m = evaluate(session(pq8_onnx), digits.test, pq8.trigger)
    efrap_m = evaluate(session(out, exact=True), digits.test, pq8.trigger)
    assert efrap_m.asr <= max(0.03, float_m.asr + 0.01)
    assert efrap_m.clean_acc >= float_m.clean_acc - 0.01


def test_a_loose_budget_takes_the_strongest_flipping_and_a_tight_one_never_more(clean_cnn, digits):
    fast = EFRAPConfig(iters=40, calib_size=256, budget=100.0, holdout=128, max_strength=0.5, margin_cap=None)
    loose = defend(clean_cnn, digits.train.x[:384], config=fast.replace(budget=100.0), progress=False)
    tight = defend(clean_cnn, digits.train.x[:384], config=fast.replace(budget=0.0), progress=False)
    assert [lp.stats["strength"] for lp in loose.layers.values()] == [0.5] * 4
    for name, lp in tight.layers.items():
        assert lp.stats["strength"] <= loose[name].stats["strength"]
        assert lp.stats["steps"] <= loose[name].stats["steps"]
    higher = defend(
        clean_cnn, digits.train.x[:384], config=fast.replace(budget=100.0, max_strength=0.7), progress=False
    )
    assert [lp.stats["strength"] for lp in higher.layers.values()] == [0.7] * 4
    assert [lp.stats["steps"] for lp in higher.layers.values()] == [8 * (40 // 4)] * 4  # 0, 0.1, ..., 0.7
    for name, lp in higher.layers.items():
        assert lp.stats["flipped_share"] > loose[name].stats["flipped_share"]
    # the torch path measures on the partially quantized model itself: the last layer's figure is the model's
    assert tight.disagreement == tight[list(tight.layers)[-1]].stats["disagreement"]
    assert tight.meta.calib_size == 256
    assert tight.resolution == pytest.approx(100 / 128) and loose.resolution == tight.resolution  # 256 + 128


def test_a_margin_cap_stops_each_ladder_where_held_out_margins_start_to_fall(clean_cnn, digits, caplog):
    # 4 bits, every learnable weight flipped at the ladder's top: uncapped, a quarter of the held-out
    # margins halve; a cap holds each layer to the rung before the first one over it
    fast = EFRAPConfig(iters=40, calib_size=256, holdout=128, budget=100.0, max_strength=1.0, margin_cap=None)
    calib = digits.train.x[:384]
    uncapped = defend(clean_cnn, calib, config=fast, bits=4, progress=False)
    assert [lp.stats["strength"] for lp in uncapped.layers.values()] == [1.0] * 4
    assert uncapped.margin_risk > 10
    resolution = 100 / 128  # 384 = calib_size 256 + holdout 128
    for cap in (0.0, 3.0):
        caplog.clear()
        capped = defend(clean_cnn, calib, config=fast.replace(margin_cap=cap), bits=4, progress=False)
        for lp in capped.layers.values():  # the weakest rung is kept whatever it measures
            assert lp.stats["margin_risk"] <= cap + resolution + 1e-9 or lp.stats["strength"] == 0.0
        assert sum(lp.stats["strength"] for lp in capped.layers.values()) <= 2.0
        assert capped.margin_risk == capped[list(capped.layers)[-1]].stats["margin_risk"]
        # the layers over the cap at their weakest rung are named, and no other
        over = [name for name, lp in capped.layers.items() if lp.stats["margin_risk"] > cap + resolution]
        warned = [r.getMessage() for r in caplog.records if "margin cap" in r.getMessage()]
        assert bool(warned) == bool(over)
        for name in over:
            assert f"{name} (" in warned[0] and f"of {len(over)} of 4 layers" in warned[0]
    # 2 bits: quantization alone halves many held-out margins; a 3% cap is over from the first layer on
    caplog.clear()
    two = defend(clean_cnn, calib, config=fast.replace(margin_cap=3.0), bits=2, progress=False)
    first = next(iter(two.layers.values()))
    assert first.stats["strength"] == 0.0 and first.stats["margin_risk"] > 3.0 + resolution
    (warned,) = [r.getMessage() for r in caplog.records if "margin cap" in r.getMessage()]
    assert f"{next(iter(two.layers))} (" in warned and "Raise margin_cap (--margin-cap) above" in warned


def test_budget_mode_needs_class_scores_to_decide_between():
    for reference in (torch.zeros(8), torch.zeros(8, 1)):
        with pytest.raises(
            DataError, match=r"no classes to decide between. Set budget=None \(--budget off\)"
        ):
            HeldOut(reference, lambda r=reference: r)


def test_brevitas_budget_mode_measures_the_users_model(digits):
    from test_brevitas_user_models import build

    from efrap_brevitas import defend_quant_model
    from efrap_brevitas.defend import _float_mode

    calib = digits.train.x[:320]
    model = build("hand-built-bn-residual", "int8-per-channel-float", calib)
    plan = defend_quant_model(model, calib, EFRAPConfig(iters=20, calib_size=256, budget=1.0), progress=False)
    with torch.no_grad():
        with _float_mode(model):
            reference = model(calib)
        held = _boundary(reference, EFRAPConfig(budget=1.0, calib_size=256))  # a quarter of 320: 80
        quantized = model(calib[held]).argmax(-1)
        reference = reference[held].argmax(-1)
    assert len(held) == 80
    assert plan.disagreement == pytest.approx(100 * float((quantized != reference).float().mean()))
    assert all(lp.stats["strength"] in BUDGET_STRENGTHS for lp in plan.layers.values())


def test_cli_budget_flag_reports_the_measured_disagreement(pq8_onnx, tmp_path, capsys):
    defend = ["defend", str(pq8_onnx), "--calib", "digits", "--out", str(tmp_path / "d.onnx")]
    code = main([*defend, "--budget", "1", "--margin-cap", "4", "--holdout", "200", "--json", "--quiet"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["verify"]["integers_ok"]
    assert summary["held_out_resolution"] == 0.5  # one of the 200 held-out images
    assert summary["held_out_choice"] == "boundary"  # the default
    code = main([*defend, "--budget", "1", "--holdout-choice", "last", "--iters", "50", "--quiet"])
    said = capsys.readouterr().out
    assert code == 0 and "of held-out images (the last given; one image: 0.39%) disagree with" in said
    assert summary["budget"] == 1.0 and 0 <= summary["disagreement"] <= 100
    assert summary["margin_cap"] == 4.0 and 0 <= summary["margin_risk"] <= 100
    assert sorted(summary["strength"]) == sorted(summary["per_layer"])
    with pytest.raises(SystemExit) as exc:
        main([*defend, "--budget", "150"])
    assert exc.value.code == 2
    assert "expected a percentage in [0, 100], got '150'" in capsys.readouterr().err
    assert main([*defend, "--budget", "1", "--flip-weight", "2"]) == 2
    assert "Give one of them (--budget off to use --flip-weight)" in capsys.readouterr().err
    assert main([*defend, "--budget", "off", "--max-strength", "0.5"]) == 2
    assert (
        "--max-strength tops budget mode's ladder, and budget is None (--budget off); give --budget PCT"
        in capsys.readouterr().err
    )
    assert main([*defend, "--objective", "preserve_only", "--margin-cap", "4"]) == 2
    assert (
        "--margin-cap caps budget mode's ladder, and budget is None (--budget off); give --budget PCT"
        in capsys.readouterr().err
    )
    assert main([*defend, "--budget", "off", "--holdout", "512"]) == 2
    assert (
        "--holdout sets the images budget mode measures on, and budget is None (--budget off); give"
        in capsys.readouterr().err
    )
    assert main([*defend, "--budget", "off", "--holdout-choice", "last"]) == 2
    assert (
        "--holdout-choice picks the images budget mode measures on, and budget is None"
        in capsys.readouterr().err
    )
