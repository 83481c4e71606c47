"""The drop-in against onnxruntime itself: the same quantize_static call through both, on a range of
models and options; the two graphs must be equal in everything but the weight integers EFRAP defends
(node types, names, order, attributes, scales, zero points, other initializers, external data)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import FIXTURES
from onnx import TensorProto, helper, numpy_helper
from onnx_models import conv_model
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
from onnxruntime.quantization import quantize_static as ort_quantize_static

import efrap_onnx
from efrap_onnx import ListDataReader
from efrap_plugin import EFRAPConfig, EFRAPError

FAST = EFRAPConfig(iters=30, calib_size=128, budget=None)  # a fixed strength flips on any model
RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _weights_independent_of_test_order():
    """Each test's models draw their weights from a fresh stream: the same weights whichever tests ran
    before it in this process (pytest-xdist shares a file's tests among workers in any order)."""
    global RNG
    RNG = np.random.default_rng(0)


def _weight(*shape: int) -> TensorProto:
    return RNG.standard_normal(shape).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _image_input(channels: int = 1):
    return [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, 8, 8])]


def unnamed_conv() -> onnx.ModelProto:
    """Conv and Gemm nodes without names (exporters often leave them empty)."""
    return _model(
        [
            helper.make_node("Conv", ["input", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"], transB=1),
        ],
        _image_input(),
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        {"w1": _weight(4, 1, 3, 3), "b1": _weight(4), "w2": _weight(10, 256), "b2": _weight(10)},
    )


def conv_bn() -> onnx.ModelProto:
    """Conv + BatchNormalization, not pre-processed: onnxruntime quantizes the unfolded Conv weight."""
    scale, bias, mean = _weight(4), _weight(4), _weight(4)
    var = np.abs(_weight(4)) + 0.5
    return _model(
        [
            helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
            helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"], name="bn"),
            helper.make_node("Relu", ["n"], ["r"], name="relu"),
            helper.make_node("Flatten", ["r"], ["logits"], name="flatten"),
        ],
        _image_input(),
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 144])],
        {"w": _weight(4, 1, 3, 3), "s": scale, "bb": bias, "m": mean, "v": var},
    )


def conv_transpose() -> onnx.ModelProto:
    return _model(
        [
            helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("ConvTranspose", ["r", "wt"], ["u"], name="up", strides=[2, 2]),
            helper.make_node("Flatten", ["u"], ["logits"], name="flatten"),
        ],
        _image_input(),
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2 * 16 * 16])],
        {"w": _weight(4, 1, 3, 3), "wt": _weight(4, 2, 2, 2)},
    )


def no_weights() -> onnx.ModelProto:
    """Only activations to quantize."""
    return _model(
        [
            helper.make_node("Relu", ["input"], ["r"], name="relu"),
            helper.make_node("Add", ["r", "input"], ["a"], name="add"),
            helper.make_node("Flatten", ["a"], ["logits"], name="flatten"),
        ],
        _image_input(),
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 64])],
        {},
    )


def conv_fp16() -> onnx.ModelProto:
    """A float16 model: onnxruntime quantizes it as it is (no Casts added before quantizing)."""
    weight = _weight(4, 1, 3, 3).astype(np.float16)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("Flatten", ["r"], ["logits"], name="flatten"),
        ],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT16, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["N", 144])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


MODELS = {
    "conv": lambda: conv_model(),
    "unnamed-conv-gemm": unnamed_conv,
    "conv-bn-not-preprocessed": conv_bn,
    "conv-transpose": conv_transpose,
    "matmul-row-tokens": lambda: onnx.load(str(FIXTURES / "row-tokens.onnx")),
    "no-weights": no_weights,
}

OPTIONS = {
    "qint8-per-channel": {"per_channel": True, "weight_type": QuantType.QInt8},
    "qint8-per-tensor": {"per_channel": False, "weight_type": QuantType.QInt8},
    "qint4-per-channel": {"per_channel": True, "weight_type": QuantType.QInt4},
    "qint8-reduce-range": {"per_channel": True, "weight_type": QuantType.QInt8, "reduce_range": True},
    "quint8-asymmetric-per-channel": {"per_channel": True, "weight_type": QuantType.QUInt8},
    "quint8-asymmetric-per-tensor": {"per_channel": False, "weight_type": QuantType.QUInt8},
    "qint4-per-tensor": {"per_channel": False, "weight_type": QuantType.QInt4},
    "qint16-per-channel": {"per_channel": True, "weight_type": QuantType.QInt16},
    "qint16-per-tensor": {"per_channel": False, "weight_type": QuantType.QInt16},
    "qdq-pair-to-weight-per-channel": {
        "per_channel": True,
        "weight_type": QuantType.QInt8,
        "extra_options": {"AddQDQPairToWeight": True},
    },
    "qdq-pair-to-weight-quint8-per-tensor": {
        "per_channel": False,
        "weight_type": QuantType.QUInt8,
        "extra_options": {"AddQDQPairToWeight": True},
    },
    "qoperator-qint8-per-channel": {
        "per_channel": True,
        "weight_type": QuantType.QInt8,
        "quant_format": QuantFormat.QOperator,
    },
    "qoperator-qint8-pair-to-weight": {  # QOperator stores the integers all the same
        "per_channel": True,
        "weight_type": QuantType.QInt8,
        "quant_format": QuantFormat.QOperator,
        "extra_options": {"AddQDQPairToWeight": True},
    },
    "qoperator-qint8-per-tensor": {
        "per_channel": False,
        "weight_type": QuantType.QInt8,
        "quant_format": QuantFormat.QOperator,
    },
    "qoperator-quint8-per-channel": {
        "per_channel": True,
        "weight_type": QuantType.QUInt8,
        "quant_format": QuantFormat.QOperator,
    },
    "qoperator-quint8-per-tensor": {
        "per_channel": False,
        "weight_type": QuantType.QUInt8,
        "quant_format": QuantFormat.QOperator,
    },
}


def _reader(digits, dtype=np.float32) -> ListDataReader:
    x = digits.train.x[:128].numpy().astype(dtype)
    return ListDataReader([{"input": x[i : i + 32]} for i in range(0, len(x), 32)])


def _run_both(model: onnx.ModelProto, tmp_path, digits, **options):
    src = tmp_path / "float.onnx"
    onnx.save(model, str(src))
    fp16 = model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    dtype = np.float16 if fp16 else np.float32
    options = {"quant_format": QuantFormat.QDQ, "activation_type": QuantType.QUInt8, **options}
    ort_quantize_static(str(src), str(tmp_path / "ort.onnx"), _reader(digits, dtype), **options)
    plan = efrap_onnx.quantize_static(
        str(src), tmp_path / "efrap.onnx", _reader(digits, dtype), config=FAST, progress=False, **options
    )
    return onnx.load(str(tmp_path / "ort.onnx")), onnx.load(str(tmp_path / "efrap.onnx")), plan


def _node_key(node: onnx.NodeProto) -> tuple:
    return (
        node.op_type,
        node.name,
        node.domain,
        tuple(node.input),
        tuple(node.output),
        tuple(str(a) for a in node.attribute),
    )


def assert_same_but_defended_weights(ort: onnx.ModelProto, ours: onnx.ModelProto, plan) -> int:
    """Everything equal but the defended weights' integers, which move by at most one step.
    Returns how many integers EFRAP changed."""
    assert [_node_key(n) for n in ours.graph.node] == [_node_key(n) for n in ort.graph.node]
    assert list(ours.opset_import) == list(ort.opset_import)
    assert list(ours.graph.input) == list(ort.graph.input) and list(ours.graph.output) == list(
        ort.graph.output
    )
    defended = {entry["quantized"] for entry in (plan.meta.layout or {}).values()}
    assert len(defended) == len(plan.layers)
    ort_inits = {t.name: t for t in ort.graph.initializer}
    our_inits = {t.name: t for t in ours.graph.initializer}
    assert sorted(our_inits) == sorted(ort_inits)
    changed = 0
    for name, theirs in ort_inits.items():
        mine = our_inits[name]
        assert (mine.data_type, list(mine.dims)) == (theirs.data_type, list(theirs.dims)), name
        if name in defended and mine.data_type == TensorProto.FLOAT:  # QuantizeLinear rounds it at run time
            a = efrap_onnx.weight_integers(ours)[name].astype(np.int64)
            b = efrap_onnx.weight_integers(ort)[name].astype(np.int64)
        else:
            a = numpy_helper.to_array(mine).astype(
                np.int64 if mine.data_type != TensorProto.FLOAT else np.float64
            )
            b = numpy_helper.to_array(theirs).astype(a.dtype)
        if name in defended:
            assert np.abs(a - b).max() <= 1, name  # a flipped rounding: one step
            changed += int((a != b).sum())
        else:
            assert np.array_equal(a, b), name
    return changed


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_the_drop_in_writes_onnxruntimes_graph_with_defended_integers(model_name, option, digits, tmp_path):
    ort, ours, plan = _run_both(MODELS[model_name](), tmp_path, digits, **OPTIONS[option])
    changed = assert_same_but_defended_weights(ort, ours, plan)
    flips = sum(int((lp.integers != lp.nearest).sum()) for lp in plan.layers.values())
    assert changed == flips  # the file differs from onnxruntime's exactly where EFRAP flipped a rounding
    if plan.layers:
        assert efrap_onnx.verify(tmp_path / "efrap.onnx", plan).integers_ok
    if not plan.layers:
        assert model_name == "no-weights"
    elif OPTIONS[option]["weight_type"] != QuantType.QInt16:
        assert flips > 0  # at 16 bits a layer may keep every nearest rounding


def test_a_float16_model_is_refused_because_onnxruntimes_own_output_cannot_run(digits, tmp_path):
    import onnxruntime as ort

    src = tmp_path / "float.onnx"
    onnx.save(conv_fp16(), str(src))
    ort_quantize_static(str(src), str(tmp_path / "ort.onnx"), _reader(digits, np.float16), per_channel=True)
    with pytest.raises(
        Exception, match=r"float16|Type"
    ):  # the premise: onnxruntime's own output does not run
        ort.InferenceSession(str(tmp_path / "ort.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(
        EFRAPError,
        match=r"writes a graph for it that onnxruntime cannot run .*quantize the float32 model",
    ):
        efrap_onnx.quantize_static(
            str(src), tmp_path / "efrap.onnx", _reader(digits, np.float16), per_channel=True
        )
    assert not (tmp_path / "efrap.onnx").exists()


def test_conv_transpose_weights_are_defended(digits, tmp_path):
    """A ConvTranspose's weight, per channel along its axis 1, is learned like a Conv's; everything else
    in the file is onnxruntime's."""
    ort, ours, plan = _run_both(conv_transpose(), tmp_path, digits, per_channel=True)
    assert assert_same_but_defended_weights(ort, ours, plan) > 0
    assert list(plan.layers) == ["w", "wt"] and plan.meta.skipped == {}


def test_options_are_honoured_as_onnxruntime_honours_them(digits, tmp_path):
    """nodes_to_exclude, op_types_to_quantize and a per-tensor override of one weight's type."""
    model = unnamed_conv()
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    cases = (
        ({"nodes_to_exclude": ["n3"]}, ["w1"]),
        ({"op_types_to_quantize": ["Conv"]}, ["w1"]),
        (
            {
                "extra_options": {
                    "TensorQuantOverrides": {"w2": [{"quant_type": QuantType.QInt8, "symmetric": True}]}
                }
            },
            ["w1", "w2"],
        ),
    )
    for options, defended in cases:
        ort, ours, plan = _run_both(model, tmp_path, digits, per_channel=True, **options)
        assert assert_same_but_defended_weights(ort, ours, plan) > 0
        assert list(plan.layers) == defended


@pytest.mark.parametrize(
    ("options", "symmetric_zero_point"),
    [
        ({"per_channel": True, "calibrate_method": CalibrationMethod.Entropy}, 0),
        ({"per_channel": True, "calibrate_method": CalibrationMethod.Percentile}, 0),
        ({"per_channel": False, "extra_options": {"WeightSymmetric": False}}, None),
        (
            {
                "per_channel": False,
                "weight_type": QuantType.QUInt8,
                "extra_options": {
                    "WeightSymmetric": True,
                    "ActivationSymmetric": True,
                    "CalibMovingAverage": True,
                },
            },
            128,
        ),
    ],
    ids=["entropy", "percentile", "asymmetric-int8-weights", "symmetric-uint8-moving-average"],
)
def test_calibration_methods_and_symmetry_options_are_onnxruntimes(
    digits, tmp_path, options, symmetric_zero_point
):
    """What a user tunes besides the types: the calibrator and the symmetry of each grid. The output is
    onnxruntime's graph for those options (its activation scales, its weight zero points: onnxruntime
    honours WeightSymmetric per tensor), with EFRAP's integers on each weight's own grid."""
    model = unnamed_conv()
    for init in model.graph.initializer:  # all positive: an asymmetric grid moves its zero point
        init.CopyFrom(numpy_helper.from_array(np.abs(numpy_helper.to_array(init)) + 0.1, init.name))
    ort, ours, plan = _run_both(model, tmp_path, digits, **options)
    assert assert_same_but_defended_weights(ort, ours, plan) > 0
    assert list(plan.layers) == ["w1", "w2"]
    zero_points = torch.cat([lp.zero_point.flatten() for lp in plan.layers.values()])
    if symmetric_zero_point is None:
        assert bool((zero_points == -128).all()), zero_points  # min(w, 0) is 0: the grid starts at qmin
    else:
        assert bool((zero_points == symmetric_zero_point).all()), zero_points


def test_external_data_is_written_as_onnxruntime_writes_it(digits, tmp_path):
    model = unnamed_conv()
    ort, ours, plan = _run_both(model, tmp_path, digits, per_channel=True, use_external_data_format=True)
    assert assert_same_but_defended_weights(ort, ours, plan) > 0
    assert (tmp_path / "efrap.onnx.data").is_file() and (tmp_path / "ort.onnx.data").is_file()

    def external(path):  # tensors over 1 KiB go to the .data file: the same ones in both
        stored = onnx.load(str(path), load_external_data=False)
        return sorted(t.name for t in stored.graph.initializer if t.data_location == TensorProto.EXTERNAL)

    assert external(tmp_path / "efrap.onnx") == external(tmp_path / "ort.onnx") != []
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "efrap.onnx",
        "efrap.onnx.data",
        "float.onnx",
        "ort.onnx",
        "ort.onnx.data",
    ]


def _matmul_pair(dtype, opset: int) -> onnx.ModelProto:
    """MatMul -> Clip -> MatMul with a batch dimension written as -1, as onnxruntime's own quantization
    tests build it (in float32 and in float16)."""
    rng = np.random.default_rng(1)
    tensor_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.1, (10, 100)).astype(dtype), "linear1.weight"),
        numpy_helper.from_array(rng.normal(0, 0.1, (100, 10)).astype(dtype), "linear2.weight"),
        numpy_helper.from_array(np.array(-1.0, dtype), "clip_min"),
        numpy_helper.from_array(np.array(1.0, dtype), "clip_max"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "linear1.weight"], ["mm1"]),
            helper.make_node("Clip", ["mm1", "clip_min", "clip_max"], ["clip"]),
            helper.make_node("MatMul", ["clip", "linear2.weight"], ["output"]),
        ],
        "matmul_pair",
        [helper.make_tensor_value_info("input", tensor_type, [-1, 10])],
        [helper.make_tensor_value_info("output", tensor_type, [-1, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9 if opset >= 19 else 8
    return model


@pytest.mark.parametrize(
    "dtype, opset, fmt, method",
    [
        (np.float32, 18, QuantFormat.QOperator, "MinMax"),
        (np.float32, 18, QuantFormat.QDQ, "Entropy"),
        (np.float32, 18, QuantFormat.QDQ, "Percentile"),
        (np.float32, 18, QuantFormat.QDQ, "Distribution"),
        (np.float16, 19, QuantFormat.QDQ, "MinMax"),
    ],
)
def test_a_dynamic_batch_written_as_minus_one_and_float16_graphs_onnxruntime_runs(
    tmp_path, dtype, opset, fmt, method
):
    """What onnxruntime's own tests quantize: a -1 batch dimension is dynamic (not a batch of -1), and a
    float16 graph whose quantized output onnxruntime runs is defended, not refused."""
    src = tmp_path / "mm.onnx"
    onnx.save(_matmul_pair(dtype, opset), str(src))
    rng = np.random.default_rng(0)
    batches = [{"input": rng.integers(-1, 2, (5, 10)).astype(dtype)} for _ in range(2)]
    options = {"quant_format": fmt, "calibrate_method": getattr(CalibrationMethod, method)}
    options.update(activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8)
    ort_quantize_static(str(src), str(tmp_path / "ort.onnx"), ListDataReader(batches), **options)
    out = tmp_path / "efrap.onnx"
    plan = efrap_onnx.quantize_static(
        str(src), out, ListDataReader(batches), config=FAST, progress=False, **options
    )
    assert len(plan.layers) == 2 and efrap_onnx.verify(out, plan).integers_ok
    got = efrap_onnx.session(out).run(None, batches[0])[0]
    assert got.dtype == dtype and got.shape == (5, 10) and np.isfinite(got.astype(np.float32)).all()


def test_a_float16_qoperator_graph_onnxruntime_cannot_run_is_refused(tmp_path):
    """Refused exactly where onnxruntime's own output does not load (QLinearMatMul takes no float16 scale)."""
    import onnxruntime as ort

    src = tmp_path / "mm.onnx"
    onnx.save(_matmul_pair(np.float16, 19), str(src))
    batches = [{"input": np.ones((5, 10), np.float16)}]
    options = dict(
        quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8
    )
    ort_quantize_static(str(src), str(tmp_path / "ort.onnx"), ListDataReader(batches), **options)
    with pytest.raises(Exception, match="float16"):  # the premise: onnxruntime's own output does not load
        ort.InferenceSession(str(tmp_path / "ort.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(EFRAPError, match="writes a graph for it that onnxruntime cannot run"):
        efrap_onnx.quantize_static(
            str(src), tmp_path / "efrap.onnx", ListDataReader(batches), progress=False, **options
        )
    assert not (tmp_path / "efrap.onnx").exists()


@pytest.mark.parametrize("qtype", [QuantType.QInt8, QuantType.QUInt8])
def test_a_float16_conv_transpose_onnxruntime_runs_is_defended(tmp_path, qtype):
    """onnxruntime's own ConvTranspose float16 tests (s8s8, u8u8): its output runs, so the drop-in defends."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", ["input", "w"], ["out"], name="up")],
        "conv_transpose_fp16",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT16, [-1, 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT16, [-1, 4, 10, 10])],
        [numpy_helper.from_array(rng.normal(0, 0.3, (3, 4, 3, 3)).astype(np.float16), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    src = tmp_path / "up.onnx"
    onnx.save(model, str(src))
    batches = [{"input": rng.normal(size=(4, 3, 8, 8)).astype(np.float16)} for _ in range(2)]
    options = dict(quant_format=QuantFormat.QDQ, activation_type=qtype, weight_type=qtype)
    out = tmp_path / "efrap.onnx"
    plan = efrap_onnx.quantize_static(
        str(src), out, ListDataReader(batches), config=FAST, progress=False, **options
    )
    assert list(plan.layers) == ["w"] and efrap_onnx.verify(out, plan).integers_ok
    assert efrap_onnx.session(out).run(None, batches[0])[0].dtype == np.float16


def _fp16_graph(
    name: str, nodes: list, inits: list, input_shape: list, output_shape: list
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT16, input_shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT16, output_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _fp16_forms() -> dict[str, tuple[onnx.ModelProto, dict, float]]:
    """The float16 forms of onnxruntime's own quantization tests: a mixed-precision Add (8-bit in, its output
    converted to 16 bits), a bias too large for int32 at the nearest weight scale (onnxruntime widens the
    weight's scale), a weight the model holds as integers already, an input the model quantizes itself.
    Each: the model, quantize_static's options, the input scale."""
    rng = np.random.default_rng(0)

    def f16(a, name):
        return numpy_helper.from_array(np.asarray(a).astype(np.float16), name)

    convert = {"a": [{"quant_type": QuantType.QUInt8, "convert": {"quant_type": QuantType.QUInt16}}]}
    return {
        "mixed-precision-add": (
            _fp16_graph(
                "mixed_add",
                [
                    helper.make_node("Add", ["input", "c"], ["a"]),
                    helper.make_node("MatMul", ["a", "w"], ["output"]),
                ],
                [f16(rng.normal(0, 1, 8), "c"), f16(rng.normal(0, 0.3, (8, 4)), "w")],
                [-1, 8],
                [-1, 4],
            ),
            {"extra_options": {"TensorQuantOverrides": convert}},
            1.0,
        ),
        "int32-bias-scale-adjustment": (
            _fp16_graph(
                "bias_adjust",
                [helper.make_node("Conv", ["input", "w", "b"], ["output"])],
                [f16(rng.normal(0, 1e-3, (4, 2, 3, 3)), "w"), f16([1000, -1000, 500, 2], "b")],
                [-1, 2, 6, 6],
                [-1, 4, 4, 4],
            ),
            {},
            1e-3,
        ),
        "prequantized-weight": (
            _fp16_graph(
                "prequantized_weight",
                [
                    helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"]),
                    helper.make_node("MatMul", ["input", "wd"], ["output"]),
                ],
                [
                    numpy_helper.from_array(rng.integers(-127, 128, (8, 4)).astype(np.int8), "wq"),
                    f16(0.01, "ws"),
                    numpy_helper.from_array(np.array(0, np.int8), "wz"),
                ],
                [-1, 8],
                [-1, 4],
            ),
            {},
            1.0,
        ),
        "prequantized-input": (
            _fp16_graph(
                "prequantized_input",
                [
                    helper.make_node("QuantizeLinear", ["input", "is", "iz"], ["iq"]),
                    helper.make_node("DequantizeLinear", ["iq", "is", "iz"], ["idq"]),
                    helper.make_node("MatMul", ["idq", "w"], ["output"]),
                ],
                [
                    f16(0.02, "is"),
                    numpy_helper.from_array(np.array(128, np.uint8), "iz"),
                    f16(rng.normal(0, 0.3, (8, 4)), "w"),
                ],
                [-1, 8],
                [-1, 4],
            ),
            {},
            1.0,
        ),
    }


@pytest.mark.parametrize("form", list(_fp16_forms()))
def test_the_float16_forms_of_onnxruntimes_own_tests_are_quantized_as_onnxruntime_does(tmp_path, form):
    """Each runs in onnxruntime after its own quantize_static, and after the drop-in: defended where there is
    a float weight to round, named where the model holds its weight as integers already."""
    import onnxruntime as ort

    model, options, scale = _fp16_forms()[form]
    rng = np.random.default_rng(1)
    shape = [4, *(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])]
    batches = [{"input": (rng.normal(size=shape) * scale).astype(np.float16)} for _ in range(4)]
    src, theirs, ours = tmp_path / "f.onnx", tmp_path / "ort.onnx", tmp_path / "efrap.onnx"
    onnx.save(model, str(src))
    ort_quantize_static(str(src), str(theirs), ListDataReader(batches), **options)
    ort.InferenceSession(str(theirs), providers=["CPUExecutionProvider"]).run(None, batches[0])  # the premise
    plan = efrap_onnx.quantize_static(
        str(src), ours, ListDataReader(batches), config=FAST, progress=False, **options
    )
    got = efrap_onnx.session(ours).run(None, batches[0])[0]
    assert got.dtype == np.float16 and np.isfinite(got.astype(np.float32)).all()
    if form == "prequantized-weight":
        assert plan.layers == {} and "integers already in the model given" in plan.meta.skipped["wq"]
        held = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(ours)).graph.initializer}
        assert np.array_equal(held["wq"], numpy_helper.to_array(model.graph.initializer[0]))  # left as given
        return
    assert list(plan.layers) == ["w"]
    assert efrap_onnx.verify(ours, plan, float_model=str(src)).integers_ok
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(ours)).graph.initializer}
    if form == "int32-bias-scale-adjustment":  # onnxruntime widened the weight's scale past max|w| / 127
        absmax = np.abs(numpy_helper.to_array(model.graph.initializer[0]).astype(np.float32)).max()
        assert float(stored["w_scale"]) > 10 * absmax / 127
    if form == "mixed-precision-add":  # the Add's output converted to 16 bits, as asked
        assert any(v.dtype == np.uint16 for k, v in stored.items() if k.startswith("a_"))
