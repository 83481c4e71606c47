"""EFRAP switched on by configuration in onnxruntime's flow: the user's own, unchanged quantize_static
after ``efrap_onnx.snap`` (stock onnxruntime writes EFRAP's integers), and the drop-in's
``extra_options["EFRAP"]`` (a config file can switch it). Each gives the one-call route's integers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import FIXTURES
from onnx import numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, StaticQuantConfig
from onnxruntime.quantization import quantize_static as ort_quantize_static
from test_onnx_compat import _matmul_pair

import efrap_onnx
from efrap_onnx import ListDataReader
from efrap_plugin import EFRAPConfig, EFRAPError

FAST = EFRAPConfig(iters=30, calib_size=128)
MODEL = FIXTURES / "pqbackdoor-ort8" / "model.onnx"


def _reader(calib) -> ListDataReader:
    return ListDataReader.from_array(onnx.load(str(MODEL)).graph.input[0].name, calib[:256])


def _weights(path) -> dict[str, np.ndarray]:
    return {
        t.name: numpy_helper.to_array(t)
        for t in onnx.load(str(path)).graph.initializer
        if t.name.endswith(("_quantized", "_scale", "_zero_point"))
    }


@pytest.mark.parametrize(
    "options",
    [
        {"per_channel": True},
        {"per_channel": False},
        {"per_channel": True, "weight_type": QuantType.QUInt8, "activation_type": QuantType.QUInt8},
        {"per_channel": True, "reduce_range": True},
    ],
    ids=["per-channel", "per-tensor", "u8u8", "reduce-range"],
)
def test_stock_onnxruntime_after_snap_writes_the_drop_ins_integers(calib, tmp_path, options):
    plan, extra = efrap_onnx.snap(
        MODEL, tmp_path / "snapped.onnx", _reader(calib), config=FAST, progress=False, **options
    )
    # the user's own call, unchanged but for the extra options snap returned
    ort_quantize_static(
        str(tmp_path / "snapped.onnx"),
        str(tmp_path / "stock.onnx"),
        _reader(calib),
        extra_options=extra,
        **options,
    )
    report = efrap_onnx.verify(tmp_path / "stock.onnx", plan, float_model=MODEL)
    assert report.integers_ok and report.layers == len(plan.layers) > 0
    drop_in = efrap_onnx.quantize_static(
        MODEL, tmp_path / "drop-in.onnx", _reader(calib), config=FAST, progress=False, **options
    )
    stock, ours = _weights(tmp_path / "stock.onnx"), _weights(tmp_path / "drop-in.onnx")
    for name, lp in drop_in.layers.items():  # the same integers, scales and zero points as the one call
        assert np.array_equal(plan[name].integers, lp.integers)
        for suffix in ("_quantized", "_scale", "_zero_point"):
            assert np.array_equal(stock[name + suffix], ours[name + suffix]), name + suffix
    assert plan.flipped_share > 0  # EFRAP's rounding, not nearest, is what stock onnxruntime wrote


def test_snap_keeps_a_matmuls_layout_and_the_users_other_overrides(tmp_path):
    src = tmp_path / "mm.onnx"
    onnx.save(_matmul_pair(np.float32, 18), str(src))
    rng = np.random.default_rng(0)
    batches = [{"input": rng.normal(size=(16, 10)).astype(np.float32)} for _ in range(8)]
    theirs = {"TensorQuantOverrides": {"mm1": [{"symmetric": True}]}, "ActivationSymmetric": False}
    options = {"per_channel": True, "extra_options": theirs}
    plan, extra = efrap_onnx.snap(
        src, tmp_path / "snapped.onnx", ListDataReader(batches), config=FAST, progress=False, **options
    )
    assert (
        extra["TensorQuantOverrides"]["mm1"] == [{"symmetric": True}]
        and extra["ActivationSymmetric"] is False
    )
    assert extra["TensorQuantOverrides"]["linear1.weight"][0]["axis"] == 1  # K x N: channels on axis 1
    ort_quantize_static(
        str(tmp_path / "snapped.onnx"),
        str(tmp_path / "stock.onnx"),
        ListDataReader(batches),
        per_channel=True,
        extra_options=extra,
    )
    assert list(plan.layers) == ["linear1.weight", "linear2.weight"]
    assert efrap_onnx.verify(tmp_path / "stock.onnx", plan).integers_ok


def test_snap_refuses_what_it_cannot_pin(calib, tmp_path):
    with pytest.raises(EFRAPError, match="snap for QuantFormat.QDQ"):
        efrap_onnx.snap(
            MODEL, tmp_path / "s.onnx", _reader(calib), quant_format=QuantFormat.QOperator, config=FAST
        )
    weight = next(iter(efrap_onnx.folded_weights(MODEL)))
    pinned = {"TensorQuantOverrides": {weight: [{"scale": np.float32(0.1), "zero_point": 0}]}}
    with pytest.raises(EFRAPError, match=f"already pins the scale of weight '{weight}'"):
        efrap_onnx.snap(
            MODEL, tmp_path / "s.onnx", _reader(calib), extra_options=pinned, config=FAST, progress=False
        )
    assert not (tmp_path / "s.onnx").exists()


def test_the_efrap_key_of_extra_options_switches_the_drop_in(calib, tmp_path):
    fields = {"iters": 30, "calib_size": 128}
    flagged = efrap_onnx.quantize_static(
        MODEL,
        tmp_path / "flag.onnx",
        _reader(calib),
        per_channel=True,
        extra_options={"EFRAP": fields},
        progress=False,
    )
    called = efrap_onnx.quantize_static(
        MODEL, tmp_path / "call.onnx", _reader(calib), per_channel=True, config=FAST, progress=False
    )
    assert flagged.meta.config == called.meta.config
    assert all(np.array_equal(lp.integers, called[n].integers) for n, lp in flagged.layers.items())
    # a config object of onnxruntime's own, as a pipeline builds it
    config = StaticQuantConfig(_reader(calib), per_channel=True, extra_options={"EFRAP": fields})
    via_config = efrap_onnx.quantize(MODEL, tmp_path / "cfg.onnx", config, progress=False)
    assert all(np.array_equal(lp.integers, called[n].integers) for n, lp in via_config.layers.items())
    # False: onnxruntime's stock flow, the same file its own quantize_static writes
    off = efrap_onnx.quantize_static(
        MODEL, tmp_path / "off.onnx", _reader(calib), per_channel=True, extra_options={"EFRAP": False}
    )
    ort_quantize_static(str(MODEL), str(tmp_path / "ort.onnx"), _reader(calib), per_channel=True)
    assert off is None
    stock, ours = _weights(tmp_path / "ort.onnx"), _weights(tmp_path / "off.onnx")
    assert stock.keys() == ours.keys() and all(np.array_equal(stock[k], ours[k]) for k in stock)
    with pytest.raises(EFRAPError, match=r'extra_options\["EFRAP"\] and config= both'):
        efrap_onnx.quantize_static(
            MODEL, tmp_path / "x.onnx", _reader(calib), extra_options={"EFRAP": fields}, config=FAST
        )
    with pytest.raises(EFRAPError, match="unknown fields"):
        efrap_onnx.quantize_static(
            MODEL, tmp_path / "x.onnx", _reader(calib), extra_options={"EFRAP": {"iter": 5}}
        )
    with pytest.raises(EFRAPError, match=r"expected True, False or a dict of EFRAPConfig fields, got str"):
        efrap_onnx.quantize_static(MODEL, tmp_path / "x.onnx", _reader(calib), extra_options={"EFRAP": "on"})
    assert not (tmp_path / "x.onnx").exists()


def test_the_onnxruntime_example_defends_an_attacked_model_by_every_route():
    """examples/onnxruntime_ptq.py --model: the drop-in, the EFRAP key of onnxruntime's own config object and
    stock onnxruntime after snap write the same integers, so they measure the same; the backdoor is removed."""
    from example_runs import assert_defended, run_example

    model = str(FIXTURES / "pqbackdoor-ort8")
    rows = [
        run_example("onnxruntime_ptq.py", "--model", model, "--route", r)
        for r in ("drop-in", "flag", "stock-onnxruntime")
    ]
    for row in rows:
        assert_defended(row)
    figures = [{k: v for k, v in row.items() if k != "route"} for row in rows]
    assert figures[0] == figures[1] == figures[2]
