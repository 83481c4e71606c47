"""Brevitas: stock Int8Weight quantization activates a QCB on its grid (measured in onnxruntime on the
QCDQ export); EFRAP's integers come out of Brevitas' own rounding bit for bit and remove it."""

from __future__ import annotations

import pytest

from efrap_brevitas import export_qcdq, quantize_brevitas, read_qcdq_integers, verify_qcdq
from efrap_onnx import session
from efrap_plugin import EFRAPError, defend
from efrap_plugin.redteam import evaluate


def test_stock_brevitas_qcdq_activates_the_backdoor(pq8, digits, tmp_path):
    # onnxruntime's int8 grid and Brevitas' narrow-range per-channel grid are the same: max|w| / 127
    quantized = quantize_brevitas(pq8.model, digits.train.x[:1024])
    path = export_qcdq(quantized, digits.train.x[:2], tmp_path / "stock.onnx")
    in_ort = evaluate(session(path, exact=True), digits.test, pq8.trigger)
    assert in_ort.asr >= 0.90
    assert in_ort.asr == pytest.approx(evaluate(quantized, digits.test, pq8.trigger).asr, abs=0.01)


def test_defended_brevitas_holds_the_plan_and_removes_the_backdoor(pq8, digits, tmp_path):
    plan = defend(pq8.model, digits.train.x, "brevitas-int8", progress=False)
    path = export_qcdq(
        quantize_brevitas(pq8.model, digits.train.x[:1024], plan), digits.train.x[:2], tmp_path / "efrap.onnx"
    )
    report = verify_qcdq(path, plan)
    assert report.integers_ok and report.matching == 4
    ints, _ = read_qcdq_integers(path)
    assert all(int(t.min()) >= -127 and int(t.max()) <= 127 for t in ints.values())
    float_m = evaluate(pq8.model, digits.test, pq8.trigger)
    defended = evaluate(session(path, exact=True), digits.test, pq8.trigger)
    assert defended.asr <= max(0.03, float_m.asr + 0.01)  # no more backdoor than the float model's
    assert defended.clean_acc >= float_m.clean_acc - 0.01


def test_a_plan_for_another_backend_is_refused(pq8, digits):
    from efrap_plugin import EFRAPConfig

    plan = defend(pq8.model, digits.train.x[:64], "onnxruntime", EFRAPConfig(iters=10), progress=False)
    with pytest.raises(EFRAPError, match=r"Brevitas' Int8Weight quantizers need scheme='brevitas-int8'"):
        quantize_brevitas(pq8.model, digits.train.x[:64], plan)
