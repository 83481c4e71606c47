"""Triggers and metrics, checked against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from efrap_plugin import EFRAPError, LabeledData
from efrap_plugin.redteam import (
    Metrics,
    PatchTrigger,
    asr,
    clean_acc,
    der,
    evaluate,
    intervals,
    outcomes,
    paired_change,
    ra,
    wilson_interval,
)


def test_corner_patch_lands_where_expected():
    trig = PatchTrigger.corner(4, margin=1, target=0)
    x = torch.zeros(2, 3, 32, 32)
    out = trig.apply(x)
    assert float(x.sum()) == 0.0  # the input is not modified
    assert float(out.sum()) == 2 * 3 * 16
    assert float(out[0, 2, 27:31, 27:31].min()) == 1.0 and float(out[0, :, 31, :].sum()) == 0.0
    assert float(out[0, :, 26, :].sum()) == 0.0


def test_trigger_json_round_trip_and_fit_check():
    trig = PatchTrigger(size=2, row=1, col=3, value=0.5, target=7)
    assert PatchTrigger.from_json(trig.to_json()) == trig
    with pytest.raises(EFRAPError, match=r"does not fit a 8x8 image"):
        PatchTrigger.corner(9).apply(torch.zeros(1, 1, 8, 8))
    with pytest.raises(EFRAPError, match=r"unknown|expected a dict"):
        PatchTrigger.from_dict({"size": 2, "colour": "red"})


def _toy_data():
    # 6 images; labels 0,0,1,1,2,2; the "model" reads its answer from pixel (0,0) and, if the
    # trigger's corner pixel is lit, answers the target for the images whose pixel (0,1) is 1.
    x = torch.zeros(6, 1, 4, 4)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 2, 0])  # 4 of 6 right
    x[:, 0, 0, 0] = preds.float()
    x[[2, 4, 5], 0, 0, 1] = 1.0  # these fall for the trigger
    return LabeledData(x, y, 3)


def _toy_model(x):
    pred = x[:, 0, 0, 0].long()
    triggered = x[:, 0, 3, 3] == 1.0
    pred = torch.where(triggered & (x[:, 0, 0, 1] == 1.0), torch.zeros_like(pred), pred)
    return torch.nn.functional.one_hot(pred, 3).float()


def test_metrics_match_hand_computed_values():
    data, trig = _toy_data(), PatchTrigger(size=1, row=3, col=3, target=0)
    assert clean_acc(_toy_model, data) == pytest.approx(4 / 6)
    # non-target images: indices 2,3,4,5 (labels 1,1,2,2); 2,4,5 go to the target -> asr 3/4
    assert asr(_toy_model, data, trig) == pytest.approx(3 / 4)
    # robust accuracy: only index 3 keeps its true label (pred 1 == label 1)
    assert ra(_toy_model, data, trig) == pytest.approx(1 / 4)
    m = evaluate(_toy_model, data, trig)
    assert (m.clean_acc, m.asr, m.ra) == pytest.approx((4 / 6, 3 / 4, 1 / 4))
    hits = outcomes(_toy_model, data, trig)  # image by image, what those shares count
    assert hits.right.tolist() == [True, False, True, True, True, False]
    assert hits.to_target.tolist() == [True, False, True, True] and hits.kept.tolist() == [
        False,
        True,
        False,
        False,
    ]
    assert outcomes(_toy_model, data).to_target is None and hits.metrics() == m


def test_wilson_intervals_match_the_textbook_values():
    # Wilson score intervals at z = 1.96 (Newcombe 1998, table I): 0/10, 5/10, 81/263
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(EFRAPError, match=r"0 <= hits <= n and n > 0, got hits=3, n=2"):
        wilson_interval(3, 2)


def test_intervals_are_taken_on_the_images_each_metric_was_measured_on():
    data, trig = _toy_data(), PatchTrigger(size=1, row=3, col=3, target=0)
    got = intervals(evaluate(_toy_model, data, trig), data, trig)
    assert got["clean_acc"] == pytest.approx(wilson_interval(4, 6))  # every image
    assert got["asr"] == pytest.approx(wilson_interval(3, 4))  # the 4 non-target images
    assert got["ra"] == pytest.approx(wilson_interval(1, 4))
    assert set(intervals(Metrics(0.5, float("nan"), float("nan")), data)) == {"clean_acc"}


def test_paired_change_covers_the_true_change_as_often_as_it_says():
    # two models that agree on most items: both right 96.5%, only the first 1.5%, only the second 0.5%
    rng, probs = np.random.default_rng(0), [0.965, 0.015, 0.005, 0.015]
    truth, covered = probs[2] - probs[1], 0
    for _ in range(2000):
        cell = torch.from_numpy(rng.choice(4, size=540, p=probs))
        change, lo, hi = paired_change((cell == 0) | (cell == 1), (cell == 0) | (cell == 2))
        covered += lo <= truth <= hi
        assert lo <= change <= hi
    # 95% nominal; two separate Wilson intervals, ignoring the pairing, cover 99.6% of these draws
    assert 0.95 <= covered / 2000 <= 0.985
    same = torch.tensor([True] * 530 + [False] * 10)
    change, lo, hi = paired_change(same, same)
    assert (
        change == 0 and lo < 0 < hi and hi - lo < 0.02
    )  # agreement on every item: tighter than unpaired (0.035)
    with pytest.raises(EFRAPError, match=r"one hit per item for both models, got 3 and 2"):
        paired_change(torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool))


def test_der_subtracts_the_accuracy_drop():
    before, after = Metrics(0.95, 0.99, 0.0), Metrics(0.93, 0.02, 0.9)
    assert der(before, after) == pytest.approx((0.97 - 0.02 + 1) / 2)
    assert der(after, before) == pytest.approx((0 - 0 + 1) / 2)


def test_metrics_on_an_onnxruntime_session(pq8_onnx, pq8, digits):
    from efrap_onnx import session

    sess = evaluate(session(pq8_onnx), digits.test, pq8.trigger)
    torch_m = evaluate(pq8.model, digits.test, pq8.trigger)
    assert sess.clean_acc == pytest.approx(torch_m.clean_acc, abs=2e-3)
    assert sess.asr == pytest.approx(torch_m.asr, abs=5e-3)


def test_model_output_shape_is_checked():
    with pytest.raises(EFRAPError, match=r"expected batch x classes logits, got shape \(3,\)"):
        clean_acc(
            lambda x: torch.zeros(x.shape[0]), LabeledData(torch.rand(3, 1, 4, 4), torch.zeros(3).long(), 2)
        )
