"""The ONNX adapter: defend a float ONNX file alone, prove it from the written file, refuse bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import FIXTURES, TokenClassifier
from onnx import TensorProto, helper, numpy_helper
from onnx_models import conv_model, graph_model
from onnxruntime.quantization import QuantType

from efrap_onnx import ListDataReader, load_onnx, quantize_static, session, verify
from efrap_plugin import DataError, EFRAPConfig, EFRAPError, ModelError, PlanMismatchError
from efrap_plugin.redteam import backdoor_removed, evaluate


def _reader(calib, name="input"):
    return ListDataReader.from_array(name, calib)


def _quantize(src, out, calib, weight_type=QuantType.QInt8, **options):
    """The drop-in as the README calls it: per channel, uint8 activations."""
    return quantize_static(
        src,
        out,
        _reader(calib),
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=weight_type,
        progress=False,
        **options,
    )


@pytest.fixture(scope="module")
def defended8(pq8_onnx, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("defended") / "efrap-int8.onnx"
    return out, _quantize(pq8_onnx, out, calib)


def test_defend_float_onnx_removes_the_backdoor_in_onnxruntime(
    pq8, pq8_onnx, defended8, calib, digits, tmp_path
):
    stock_path = tmp_path / "stock.onnx"
    _quantize(pq8_onnx, stock_path, calib, efrap=False)
    float_m = evaluate(session(pq8_onnx), digits.test, pq8.trigger)
    stock = evaluate(session(stock_path, exact=True), digits.test, pq8.trigger)
    defended = evaluate(session(defended8[0], exact=True), digits.test, pq8.trigger)
    assert stock.asr >= 0.90
    # The project's bar: no more backdoor than the float model the user started from (which keeps 6.2%
    # here; the 3% bar over attack seeds is measured in benchmarks/results/cells-per-seed.md).
    assert defended.asr <= max(0.03, float_m.asr + 0.01)
    assert defended.clean_acc >= float_m.clean_acc - 0.01


def test_qoperator_output_holds_the_same_integers_and_removes_the_backdoor(
    pq8, pq8_onnx, defended8, calib, digits, tmp_path
):
    """QuantFormat.QOperator: onnxruntime's QLinearConv / QGemm graph, with the integers EFRAP learned
    on the QDQ graph of the same call (same scales), so the same defense."""
    from onnxruntime.quantization import QuantFormat

    path = tmp_path / "qop.onnx"
    plan = _quantize(pq8_onnx, path, calib, quant_format=QuantFormat.QOperator)
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("QLinearConv") == 3
    report = verify(path, plan)
    assert report.integers_ok and report.matching == 4
    qdq_plan = defended8[1]
    assert all(torch.equal(plan[k].integers, qdq_plan[k].integers) for k in qdq_plan.layers)
    float_m = evaluate(session(pq8_onnx), digits.test, pq8.trigger)
    assert backdoor_removed(float_m, evaluate(session(path, exact=True), digits.test, pq8.trigger))


def test_weights_kept_in_float_behind_a_quantize_linear_are_defended_and_read_back(
    pq8, pq8_onnx, defended8, calib, digits, tmp_path
):
    """extra_options AddQDQPairToWeight: onnxruntime keeps each weight in float and rounds it to nearest
    at run time, through a QuantizeLinear; the stock model fires. EFRAP stores the grid points of its
    integers there instead, which that QuantizeLinear rounds back exactly: the same plan as the stored
    QDQ graph's, read back by onnxruntime's own QuantizeLinear, and a nudged weight is caught."""
    pair = {"extra_options": {"AddQDQPairToWeight": True}}
    _quantize(pq8_onnx, tmp_path / "stock.onnx", calib, efrap=False, **pair)
    float_m = evaluate(session(pq8_onnx), digits.test, pq8.trigger)
    assert evaluate(session(tmp_path / "stock.onnx", exact=True), digits.test, pq8.trigger).asr >= 0.90
    path = tmp_path / "pair.onnx"
    plan = _quantize(pq8_onnx, path, calib, **pair)
    qdq_plan = defended8[1]
    assert list(plan.layers) == list(qdq_plan.layers)
    assert all(torch.equal(plan[k].integers, qdq_plan[k].integers) for k in qdq_plan.layers)
    report = verify(path, plan)
    assert report.integers_ok and report.matching == 4
    assert backdoor_removed(float_m, evaluate(session(path, exact=True), digits.test, pq8.trigger))
    model = onnx.load(str(path))
    name = next(iter(plan.meta.layout.values()))["quantized"]
    scale = next(iter(plan.layers.values())).scale
    for t in model.graph.initializer:
        if t.name == name:
            arr = numpy_helper.to_array(t).copy()
            arr[0] += 0.6 * float(scale[0])  # over half a step: QuantizeLinear rounds to the next integer
            t.CopyFrom(numpy_helper.from_array(arr, name))
    onnx.save(model, str(tmp_path / "nudged.onnx"))
    with pytest.raises(PlanMismatchError, match=r"does not hold the plan's integers"):
        verify(tmp_path / "nudged.onnx", plan)


def test_verify_reads_the_integers_back_and_sees_int8_kernels(defended8):
    path, plan = defended8
    report = verify(path, plan)
    assert report.integers_ok and report.matching == 4
    assert report.int_kernels == {"QLinearConv": 3, "QGemm": 1}
    assert 0.05 < plan.flipped_share < 0.95


def test_verify_catches_a_tampered_file(defended8, tmp_path):
    path, plan = defended8
    model = onnx.load(str(path))
    name = next(iter(plan.meta.layout.values()))["quantized"]
    for t in model.graph.initializer:
        if t.name == name:
            arr = numpy_helper.to_array(t).copy()
            arr.flat[:5] = 0
            t.CopyFrom(numpy_helper.from_array(arr, name))
    onnx.save(model, str(tmp_path / "tampered.onnx"))
    with pytest.raises(PlanMismatchError, match=r"does not hold the plan's integers"):
        verify(tmp_path / "tampered.onnx", plan)


def test_stock_path_matches_onnxruntime_quantize_static_itself(pq8_onnx, calib, tmp_path):
    """No pre-processing the user did not ask for: the graph the user gave, as onnxruntime quantizes it."""
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    ours = tmp_path / "ours.onnx"
    _quantize(pq8_onnx, ours, calib, efrap=False)
    ort_quantize_static(
        str(pq8_onnx),
        str(tmp_path / "theirs.onnx"),
        _reader(calib),
        per_channel=True,
        activation_type=QuantType.QUInt8,
    )
    a = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(ours)).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "theirs.onnx")).graph.initializer}
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("per_channel", [True, False])
def test_matmul_weights_are_defended_and_run_as_qlinearmatmul(digits, calib, tmp_path, per_channel):
    """A Linear over a 3-D input (each image row a token) exports as MatMul + Add (tests/fixtures/build.py)."""
    src = FIXTURES / "row-tokens.onnx"
    assert [n.op_type for n in onnx.load(str(src)).graph.node].count("MatMul") == 1
    plan = quantize_static(src, tmp_path / "d.onnx", _reader(calib), per_channel=per_channel, progress=False)
    report = verify(tmp_path / "d.onnx", plan)
    assert report.integers_ok and report.matching == 2
    assert report.int_kernels == {"QLinearMatMul": 1, "QGemm": 1}
    assert all(0.05 < lp.flipped_share < 0.95 for lp in plan.layers.values())
    float_acc = evaluate(session(src), digits.test).clean_acc
    assert evaluate(session(tmp_path / "d.onnx", exact=True), digits.test).clean_acc >= float_acc - 0.01


def test_int4_weights_are_written_as_onnx_int4(pq8_onnx, calib, tmp_path):
    out = tmp_path / "int4.onnx"
    plan = _quantize(pq8_onnx, out, calib, QuantType.QInt4, config=EFRAPConfig(iters=100))
    weights = {v["quantized"] for v in plan.meta.layout.values()}
    types = {t.data_type for t in onnx.load(str(out)).graph.initializer if t.name in weights}
    assert types == {TensorProto.INT4}
    assert verify(out, plan).integers_ok
    assert all(int(lp.integers.min()) >= -8 and int(lp.integers.max()) <= 7 for lp in plan.layers.values())


# ----- untrusted input ----------------------------------------------------------------------------
def _no_output(tmp_path):
    return not (tmp_path / "out.onnx").exists() and not list(tmp_path.glob(".out.onnx.*"))


def test_not_onnx_is_refused_without_output(tmp_path, calib):
    (tmp_path / "model.onnx").write_bytes(b"\x00\x01 definitely not a protobuf \xff" * 10)
    with pytest.raises(ModelError, match=r"is not a readable ONNX protobuf"):
        quantize_static(tmp_path / "model.onnx", tmp_path / "out.onnx", _reader(calib))
    assert _no_output(tmp_path)


def test_corrupted_protobuf_is_refused(pq8_onnx, tmp_path, calib):
    data = pq8_onnx.read_bytes()
    (tmp_path / "model.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelError, match=r"model: .*model.onnx"):
        quantize_static(tmp_path / "model.onnx", tmp_path / "out.onnx", _reader(calib))
    assert _no_output(tmp_path)


def test_external_data_outside_the_folder_is_refused(tmp_path, calib):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(36, np.float32).tobytes())
    (tmp_path / "models").mkdir()
    model = conv_model(np.ones((4, 1, 3, 3), np.float32), location="../secret.bin")
    onnx.save(model, str(tmp_path / "models" / "model.onnx"))
    with pytest.raises(ModelError, match=r"outside the model's folder .*path traversal"):
        load_onnx(tmp_path / "models" / "model.onnx")


def test_nan_weights_are_refused(tmp_path, calib):
    w = np.ones((4, 1, 3, 3), np.float32)
    w[0, 0, 0, 0] = np.nan
    onnx.save(conv_model(w), str(tmp_path / "model.onnx"))
    with pytest.raises(ModelError, match=r"initializer 'w' holds NaN or Inf"):
        quantize_static(tmp_path / "model.onnx", tmp_path / "out.onnx", _reader(calib))
    assert _no_output(tmp_path)


def test_calibration_shape_mismatch_is_refused(pq8_onnx, tmp_path):
    bad = np.zeros((4, 1, 28, 28), np.float32)
    with pytest.raises(
        DataError, match=r"input 'input' has shape \(4, 1, 28, 28\), the graph expects \['N', 1, 8, 8\]"
    ):
        quantize_static(pq8_onnx, tmp_path / "out.onnx", _reader(bad))
    with pytest.raises(DataError, match=r"batch lacks the model input 'input'"):
        quantize_static(pq8_onnx, tmp_path / "out.onnx", _reader(np.zeros((4, 1, 8, 8), np.float32), "x"))
    assert _no_output(tmp_path)


def _conv_then_deconv(path):
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
            helper.make_node("ConvTranspose", ["c", "wt"], ["y"], name="deconv"),
        ],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 8, 8])],
        [
            numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "wt"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_conv_transpose_left_in_float_is_reported_with_its_reason(tmp_path, calib, caplog):
    """A ConvTranspose onnxruntime leaves in float (op_types_to_quantize without it) is named with its
    reason, and verify accounts for it; the Conv is defended."""
    skipped = {"deconv": "not quantized by onnxruntime: stays in float"}
    with caplog.at_level("WARNING"):
        plan = _quantize(
            _conv_then_deconv(tmp_path / "m.onnx"),
            tmp_path / "out.onnx",
            calib,
            op_types_to_quantize=["Conv"],
            config=EFRAPConfig(iters=20),
        )
    assert list(plan.layers) == ["w"] and plan.meta.skipped == skipped
    assert skipped["deconv"] in caplog.text
    report = verify(tmp_path / "out.onnx", plan)
    assert report.integers_ok and report.skipped == []


@pytest.mark.parametrize("weight_type", [QuantType.QInt8, QuantType.QInt4])
def test_a_quantized_conv_transpose_is_defended(tmp_path, calib, weight_type):
    """onnxruntime quantizes a ConvTranspose's weight with per-channel scales along axis 1 (its output
    channels); EFRAP learns it like any layer, and the file holds the learned integers, which differ from
    nearest rounding, in the ConvTranspose's own C_in x C_out layout."""
    plan = _quantize(
        _conv_then_deconv(tmp_path / "m.onnx"),
        tmp_path / "out.onnx",
        calib,
        weight_type,
        config=EFRAPConfig(),
    )
    assert list(plan.layers) == ["w", "wt"] and plan.meta.skipped == {}
    wt = plan["wt"]
    assert tuple(wt.integers.shape) == (2, 4, 3, 3) and wt.scale.numel() == 2  # output channels first
    assert wt.flipped_share > 0
    stored = next(
        numpy_helper.to_array(t)
        for t in onnx.load(str(tmp_path / "out.onnx")).graph.initializer
        if t.name == "wt_quantized"
    )
    np.testing.assert_array_equal(stored.astype(np.int32), wt.integers.transpose(0, 1).numpy())
    assert verify(tmp_path / "out.onnx", plan).integers_ok


@pytest.mark.parametrize("quant_format", ["QDQ", "QOperator"])
def test_a_weight_on_the_left_of_a_matmul_is_seen_and_reported(tmp_path, caplog, quant_format):
    """W @ x: onnxruntime quantizes a MatMul's first input when it is an initializer. EFRAP does not learn
    it, says so, and verify reads it from the file (QDQ or QLinearMatMul) and accounts for it; the
    ordinary x @ W before it is defended."""
    from onnxruntime.quantization import QuantFormat

    model = graph_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="right"),
            helper.make_node("Transpose", ["h"], ["ht"]),
            helper.make_node("MatMul", ["w2", "ht"], ["y"], name="left"),
        ],
        {"x": (TensorProto.FLOAT, ["N", 16])},
        {"y": [4, "N"]},
        {"w1": (16, 8), "w2": (4, 8)},
    )
    onnx.save(model, str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((128, 16)).astype(np.float32)
    with caplog.at_level("WARNING"):
        plan = quantize_static(
            tmp_path / "m.onnx",
            tmp_path / "d.onnx",
            _reader(x, "x"),
            quant_format=getattr(QuantFormat, quant_format),
            config=EFRAPConfig(iters=20),
        )
    reason = "MatMul left: weight as its first input (W @ x), a form EFRAP does not model; left at nearest rounding"
    assert list(plan.layers) == ["w1"] and plan.meta.skipped == {"w2_quantized": reason}
    assert reason in caplog.text
    report = verify(tmp_path / "d.onnx", plan)
    assert report.integers_ok and report.matching == 1 and report.skipped == ["w2_quantized"]
    model = onnx.load(str(tmp_path / "d.onnx"))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((4, 8), np.int8), "stray"))
    for node in model.graph.node:  # the left weight read from another initializer: verify sees it
        for i, name in enumerate(node.input):
            if name == "w2_quantized":
                node.input[i] = "stray"
    onnx.save(model, str(tmp_path / "moved.onnx"))
    with pytest.raises(PlanMismatchError, match=r"stray"):
        verify(tmp_path / "moved.onnx", plan)


@pytest.mark.parametrize("quant_format", ["QDQ", "QOperator"])
def test_a_quantized_embedding_table_is_accounted_for(tmp_path, quant_format):
    """onnxruntime quantizes a Gather's table to int8 too. It is no layer's weight that EFRAP learns: the
    plan lists it with its reader, verify reads it from the file, and a plan that does not list it fails."""
    import dataclasses

    from onnxruntime.quantization import QuantFormat

    model = graph_model(
        [
            helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
            helper.make_node("MatMul", ["e", "w"], ["y"], name="proj"),
        ],
        {"ids": (TensorProto.INT64, ["N", 5])},
        {"y": ["N", 5, 8]},
        {"emb": (50, 16), "w": (16, 8)},
    )
    onnx.save(model, str(tmp_path / "m.onnx"))
    ids = np.random.default_rng(1).integers(0, 50, (128, 5)).astype(np.int64)
    plan = quantize_static(
        tmp_path / "m.onnx",
        tmp_path / "d.onnx",
        _reader(ids, "ids"),  # token ids stay int64, as the graph takes them
        quant_format=getattr(QuantFormat, quant_format),
        config=EFRAPConfig(iters=20),
    )
    assert list(plan.layers) == ["w"] and plan.meta.skipped == {}
    assert plan.meta.constants == {"emb_quantized": "read by Gather embed"}
    report = verify(tmp_path / "d.onnx", plan)
    assert report.integers_ok and report.constants == ["emb_quantized"]
    unlisted = dataclasses.replace(plan, meta=plan.meta.replace(constants={}))
    with pytest.raises(PlanMismatchError, match=r"quantized layers the plan lacks \['emb_quantized'\]"):
        verify(tmp_path / "d.onnx", unlisted)


def test_an_unknown_format_and_float8_weights_are_explained(pq8_onnx, calib, tmp_path):
    with pytest.raises(EFRAPError, match=r"quant_format: expected QuantFormat.QDQ or QuantFormat.QOperator"):
        quantize_static(pq8_onnx, tmp_path / "o.onnx", _reader(calib), quant_format="QLinear")
    with pytest.raises(EFRAPError, match=r"weight_type: float8 weights have no integer rounding to learn"):
        quantize_static(pq8_onnx, tmp_path / "o.onnx", _reader(calib), weight_type=QuantType.QFLOAT8E4M3FN)
    assert not (tmp_path / "o.onnx").exists()


def test_quantize_images_refuses_bits_onnxruntime_cannot_store(pq8_onnx, calib, tmp_path):
    from efrap_onnx import quantize_images

    with pytest.raises(
        EFRAPError, match=r"bits: onnxruntime quantizes weights to 8 \(QInt8\) or 4 \(QInt4\) bits, got 6"
    ):
        quantize_images(pq8_onnx, tmp_path / "o.onnx", calib, 6)
    assert not (tmp_path / "o.onnx").exists()


def test_unnamed_nodes_are_matched_by_structure_and_defended(calib, tmp_path):
    """A node's name is optional in ONNX: the drop-in finds layers by graph structure, not by name."""
    model = conv_model()
    for node in model.graph.node:
        node.name = ""
    onnx.save(model, str(tmp_path / "unnamed.onnx"))
    plan = quantize_static(
        tmp_path / "unnamed.onnx", tmp_path / "d.onnx", _reader(calib[:64]), config=EFRAPConfig(iters=20)
    )
    assert list(plan.layers) == ["w"] and plan.meta.skipped == {}
    assert verify(tmp_path / "d.onnx", plan).integers_ok


def test_quantize_images_and_folded_weights_take_a_loaded_model(calib, tmp_path):
    """`efrap defend` parses the file once and hands the model on: same plan, same bytes, same folded
    weights as from the path, the caller's proto untouched; a model with two inputs is named as such."""
    from efrap_onnx import folded_weights, quantize_images

    model = conv_model()
    onnx.save(model, str(tmp_path / "m.onnx"))
    before = model.SerializeToString()
    fast = EFRAPConfig(iters=20)
    by_path = quantize_images(
        tmp_path / "m.onnx", tmp_path / "a.onnx", calib[:64], config=fast, progress=False
    )
    by_proto = quantize_images(model, tmp_path / "b.onnx", calib[:64], config=fast, progress=False)
    assert model.SerializeToString() == before
    assert torch.equal(by_proto["w"].integers, by_path["w"].integers)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    from_path, from_proto = folded_weights(tmp_path / "m.onnx"), folded_weights(model)
    assert list(from_proto) == list(from_path) == ["w"]
    assert torch.equal(from_proto["w"], from_path["w"])
    assert model.SerializeToString() == before
    two = onnx.ModelProto.FromString(before)
    two.graph.input.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1]))
    with pytest.raises(EFRAPError, match=r"model: model_input has inputs \['input', 'extra'\]; pass one"):
        quantize_images(two, tmp_path / "c.onnx", calib[:64], progress=False)
    assert not (tmp_path / "c.onnx").exists()


def test_model_proto_input_and_quantize_with_a_static_quant_config(calib, tmp_path):
    """Both of onnxruntime's documented entry points: a ModelProto as model_input, and
    quantize(model, out, StaticQuantConfig(...)); same plan as the path call, the caller's proto untouched."""
    from onnxruntime.quantization import StaticQuantConfig

    from efrap_onnx import quantize

    model = conv_model()
    onnx.save(model, str(tmp_path / "m.onnx"))
    before = model.SerializeToString()
    fast = EFRAPConfig(iters=20)
    by_path = quantize_static(tmp_path / "m.onnx", tmp_path / "a.onnx", _reader(calib[:64]), config=fast)
    by_proto = quantize_static(model, tmp_path / "b.onnx", _reader(calib[:64]), config=fast)
    by_config = quantize(model, tmp_path / "c.onnx", StaticQuantConfig(_reader(calib[:64])), config=fast)
    assert model.SerializeToString() == before
    for plan in (by_proto, by_config):
        assert torch.equal(plan["w"].integers, by_path["w"].integers)
    assert (
        (tmp_path / "a.onnx").read_bytes()
        == (tmp_path / "b.onnx").read_bytes()
        == (tmp_path / "c.onnx").read_bytes()
    )
    with pytest.raises(
        EFRAPError, match=r"quant_config: EFRAP defends static quantization .* got DynamicQuantConfig"
    ):
        from onnxruntime.quantization import DynamicQuantConfig

        quantize(model, tmp_path / "d.onnx", DynamicQuantConfig())


def test_a_weight_two_layers_read_is_defended_once_and_said_so(tmp_path, caplog):
    """Tied weights: one initializer, two MatMuls. The file holds one set of integers, the plan's, and
    the user is told that it was learned for the last reader."""
    model = graph_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w"], ["y"], name="second"),
        ],
        {"x": (TensorProto.FLOAT, ["N", 16])},
        {"y": ["N", 16]},
        {"w": (16, 16)},
    )
    onnx.save(model, str(tmp_path / "tied.onnx"))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((128, 16)).astype(np.float32)
    with caplog.at_level("WARNING"):
        plan = quantize_static(
            tmp_path / "tied.onnx", tmp_path / "d.onnx", _reader(x, "x"), config=EFRAPConfig(iters=20)
        )
    assert "w: one weight read by 2 layers (first, second)" in caplog.text
    assert list(plan.layers) == ["w"]
    report = verify(tmp_path / "d.onnx", plan)
    assert report.integers_ok and report.matching == 1 and report.int_kernels == {"QLinearMatMul": 2}


def test_a_model_with_no_weights_comes_out_as_onnxruntime_writes_it(calib, tmp_path, caplog):
    """Only activations to quantize: no error, a notice, and onnxruntime's own file."""
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["r"]), helper.make_node("Add", ["r", "input"], ["y"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    with caplog.at_level("WARNING"):
        plan = quantize_static(tmp_path / "m.onnx", tmp_path / "ours.onnx", _reader(calib[:64]))
    assert plan.layers == {} and "nothing to defend" in caplog.text
    ort_quantize_static(str(tmp_path / "m.onnx"), str(tmp_path / "theirs.onnx"), _reader(calib[:64]))
    ours, theirs = onnx.load(str(tmp_path / "ours.onnx")), onnx.load(str(tmp_path / "theirs.onnx"))
    assert [n.op_type for n in ours.graph.node] == [n.op_type for n in theirs.graph.node]
    assert {t.name: numpy_helper.to_array(t).tolist() for t in ours.graph.initializer} == {
        t.name: numpy_helper.to_array(t).tolist() for t in theirs.graph.initializer
    }


def test_strided_calibration_asks_the_reader_for_ranges(pq8_onnx, calib, tmp_path):
    """extra_options CalibStridedMinMax makes onnxruntime call reader.set_range: the drop-in's reader serves it."""
    plan = _quantize(
        pq8_onnx,
        tmp_path / "d.onnx",
        calib,
        config=EFRAPConfig(iters=20),
        extra_options={"CalibStridedMinMax": 4},
    )
    assert verify(tmp_path / "d.onnx", plan).integers_ok


def test_onnxruntime_ptq_example_on_a_transformer_encoder():
    """A user's own onnxruntime script on N x T x D tokens (examples/onnxruntime_ptq.py): every weight
    MatMul of the encoder defended and read back; the int8 model agrees with the float one."""
    from example_runs import run_example

    row = run_example("onnxruntime_ptq.py")
    assert row["integers_ok"] and row["layers"] == 14 and row["skipped"] == []
    assert row["constants"] > 0  # the Linear biases onnxruntime adds as quantized constants, accounted for
    assert row["efrap_agreement"] >= 97 and row["efrap_acc"] >= row["float_acc"] - 1


def test_a_layers_inputs_come_from_the_prefix_that_computes_them(pq8_onnx, calib):
    """session(model, [tensor]) runs only the nodes the tensor needs (onnxruntime runs every node of a
    graph whatever is fetched); the values equal the full model's, filled into one tensor."""
    from efrap_onnx.runtime import run_output, upstream

    model = load_onnx(pq8_onnx)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    prefix = upstream(model, [relu.output[0]])
    assert 0 < len(prefix.graph.node) < len(model.graph.node) // 2
    assert {t.name for t in prefix.graph.initializer} < {t.name for t in model.graph.initializer}
    batches = ListDataReader.from_array("input", calib[:100], batch_size=32).batches
    got = run_output(session(model, [relu.output[0]]), batches, relu.output[0])
    full = onnx.ModelProto.FromString(model.SerializeToString())
    full.graph.output.append(helper.make_tensor_value_info(relu.output[0], TensorProto.FLOAT, None))
    want = np.concatenate([session(full).run([relu.output[0]], b)[0] for b in batches])
    assert got.shape[0] == 100 and np.array_equal(got.numpy(), want)


def test_a_tensor_with_rows_out_of_the_batchs_proportion_is_gathered_whole():
    """A graph that reshapes N x T x D to N*T x D fills one tensor; one whose rows do not follow the
    batch (a sum over it) is concatenated, also after batches that seemed in proportion."""
    from efrap_onnx.runtime import run_output

    t, d = 64, 3
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
            helper.make_node("ReduceSum", ["x", "axis0"], ["summed"], keepdims=0),
        ],
        "shapes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", t, d])],
        [
            helper.make_tensor_value_info("flat", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("summed", TensorProto.FLOAT, None),
        ],
        [
            numpy_helper.from_array(np.array([-1, d], dtype=np.int64), "flat_shape"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).standard_normal((100, t, d)).astype(np.float32)
    batches = ListDataReader.from_array("x", x, batch_size=32).batches  # 32, 32, 32, 4 rows
    sess = session(model)
    flat = run_output(sess, batches, "flat")
    assert flat.shape == (100 * t, d) and np.array_equal(flat.numpy(), x.reshape(-1, d))
    summed = run_output(sess, batches, "summed")  # 64 rows per batch: "2 per row" until the 4-row batch
    want = np.concatenate([x[i : i + 32].sum(0) for i in range(0, 100, 32)])
    assert summed.shape == (4 * t, d) and np.allclose(summed.numpy(), want, atol=1e-5)


CONV_FORMS = {
    "same-upper-stride-2": (
        "Conv",
        [1, 2, 7, 7],
        [4, 2, 3, 3],
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    ),
    "same-lower-even-kernel": (
        "Conv",
        [1, 2, 7, 7],
        [4, 2, 4, 4],
        {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    ),
    "asymmetric-pads": ("Conv", [1, 2, 7, 7], [4, 2, 3, 3], {"pads": [0, 1, 2, 0]}),
    "dilated": ("Conv", [1, 2, 9, 9], [4, 2, 3, 3], {"pads": [2, 2, 2, 2], "dilations": [2, 2]}),
    "grouped": ("Conv", [1, 4, 7, 7], [4, 2, 3, 3], {"pads": [1, 1, 1, 1], "group": 2}),
    "valid-stride-3": ("Conv", [1, 2, 8, 8], [4, 2, 2, 2], {"auto_pad": "VALID", "strides": [3, 3]}),
    "conv1d-same-upper-no-kernel-shape": (
        "Conv",
        [1, 2, 9],
        [4, 2, 4],
        {"auto_pad": "SAME_UPPER", "strides": [2]},
    ),
    "transpose-stride-2": ("ConvTranspose", [1, 4, 5, 5], [4, 3, 3, 3], {"strides": [2, 2]}),
    "transpose-uneven-pads-output-padding": (
        "ConvTranspose",
        [1, 4, 5, 5],
        [4, 3, 3, 3],
        {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 1]},
    ),
    "transpose-grouped-dilated": (
        "ConvTranspose",
        [1, 4, 5, 5],
        [4, 2, 3, 3],
        {"group": 2, "dilations": [2, 2], "pads": [1, 1, 1, 1]},
    ),
    "transpose-1d": ("ConvTranspose", [1, 2, 9], [2, 4, 3], {"strides": [2], "pads": [1, 1]}),
}


@pytest.mark.parametrize("form", list(CONV_FORMS))
def test_a_conv_layer_is_modelled_as_onnxruntime_computes_it(form, tmp_path):
    """What EFRAP preserves is the layer's output as onnxruntime computes it: the torch function each Conv
    form becomes (auto_pad SAME_UPPER / SAME_LOWER / VALID, asymmetric pads, dilations, groups, Conv1d with
    no kernel_shape; ConvTranspose with strides, uneven pads, output padding, groups, dilations, 1-D) gives
    onnxruntime's float output on the same input and weights, the weight in the core's layout (output
    channels first: a ConvTranspose's axes 0 and 1 swapped)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    from efrap_onnx.graph import find_quantized_layers

    op, x_shape, w_shape, attrs = CONV_FORMS[form]
    rng = np.random.default_rng(0)
    w = rng.standard_normal(w_shape).astype(np.float32)
    out_channels = w_shape[1] * attrs.get("group", 1) if op == "ConvTranspose" else w_shape[0]
    b = rng.standard_normal(out_channels).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "w", "b"], ["y"], name="conv", **attrs)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    float_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(float_model, str(tmp_path / "f.onnx"))
    x = rng.standard_normal((16, *x_shape[1:])).astype(np.float32)
    ort_quantize_static(
        str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), _reader(x, "x"), weight_type=QuantType.QInt8
    )
    layers, skipped, _ = find_quantized_layers(
        onnx.load(str(tmp_path / "q.onnx")), float_model, include_relu=False
    )
    assert [layer.node for layer in layers] == ["conv"] and skipped == {}
    want = session(tmp_path / "f.onnx").run(None, {"x": x})[0]
    core = np.ascontiguousarray(w.swapaxes(0, 1)) if op == "ConvTranspose" else w
    got = layers[0].forward(torch.from_numpy(x), torch.from_numpy(core)).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "node, x_shape, y_shape, w_shape",
    [
        (
            helper.make_node("MatMul", ["x", "w"], ["y"], name="f"),
            ["N", 2, 5, 16],
            ["N", 2, 5, 8],
            (2, 16, 8),
        ),
        (helper.make_node("Gemm", ["x", "w"], ["y"], name="f", transA=1), [16, "N"], ["N", 8], (16, 8)),
        (
            helper.make_node("Conv", ["x", "w"], ["y"], name="f", pads=[1] * 6),
            ["N", 2, 4, 4, 4],
            ["N", 4, 4, 4, 4],
            (4, 2, 3, 3, 3),
        ),
        (  # onnxruntime works the pads out from output_shape at run time
            helper.make_node(
                "ConvTranspose", ["x", "w"], ["y"], name="f", strides=[2, 2], output_shape=[10, 10]
            ),
            ["N", 4, 5, 5],
            ["N", 2, 10, 10],
            (4, 2, 3, 3),
        ),
    ],
    ids=["matmul-batched-weight", "gemm-trans-a", "conv3d", "conv-transpose-output-shape"],
)
def test_a_weight_in_a_form_efrap_does_not_model_is_named_not_a_crash(
    tmp_path, node, x_shape, y_shape, w_shape
):
    """Weights onnxruntime quantizes in forms EFRAP has no torch function for (a batched MatMul constant,
    Gemm with transA, Conv3d): named with the reason and left at nearest rounding, no error from inside
    torch; with nothing learned, verify refuses to call the file defended."""
    model = graph_model([node], {"x": (TensorProto.FLOAT, x_shape)}, {"y": y_shape}, {"w": w_shape})
    onnx.save(model, str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((64, *[d for d in x_shape if d != "N"])).astype(np.float32)
    if x_shape[-1] == "N":  # samples along the last axis
        rows = rng.standard_normal((x_shape[0], 64)).astype(np.float32)
        batches = [{"x": rows[:, i : i + 16]} for i in range(0, 64, 16)]
    else:
        batches = [{"x": rows[i : i + 16]} for i in range(0, 64, 16)]
    plan = quantize_static(
        tmp_path / "m.onnx", tmp_path / "d.onnx", ListDataReader(batches), config=EFRAPConfig(iters=20)
    )
    reason = f"{node.op_type} f: a form EFRAP does not model; left at nearest rounding"
    assert plan.layers == {} and plan.meta.skipped == {"w_quantized": reason}
    with pytest.raises(PlanMismatchError, match=r"the plan holds no layer"):
        verify(tmp_path / "d.onnx", plan)


def test_per_channel_scales_along_a_matmuls_input_channels_are_named_not_a_crash(tmp_path):
    """extra_options QDQOpTypePerChannelSupportToAxis {"MatMul": 0}: onnxruntime gives a MatMul weight one
    scale per input channel. EFRAP's grids are per output channel: the weight is named with the reason and
    left at nearest rounding (it stopped with a shape error from inside torch); the Gemm beside it is
    defended and verified."""
    model = graph_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Gemm", ["h", "w2"], ["y"], name="gm", transB=1),
        ],
        {"x": (TensorProto.FLOAT, ["N", 16])},
        {"y": ["N", 4]},
        {"w": (16, 8), "w2": (4, 8)},
    )
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(1).standard_normal((128, 16)).astype(np.float32)
    plan = quantize_static(
        tmp_path / "m.onnx",
        tmp_path / "d.onnx",
        _reader(x, "x"),
        per_channel=True,
        extra_options={"QDQOpTypePerChannelSupportToAxis": {"MatMul": 0}},
        config=EFRAPConfig(iters=20),
    )
    assert list(plan.layers) == ["w2"]
    assert plan.meta.skipped == {
        "w_quantized": "MatMul mm: per-channel scales along axis 0, its input channels; EFRAP learns grids "
        "per output channel; left at nearest rounding"
    }
    report = verify(tmp_path / "d.onnx", plan)
    assert report.integers_ok and report.skipped == ["w_quantized"]


def test_per_channel_8_bit_below_opset_13_is_refused_with_the_fix(calib, tmp_path):
    """onnxruntime writes per-channel int8 weights below opset 13 as a model that neither the ONNX checker
    nor onnxruntime loads: refused before any output, with the fix; per tensor the same model is defended."""
    onnx.save(conv_model(opset=11), str(tmp_path / "old.onnx"))
    with pytest.raises(
        ModelError, match=r"needs opset 13 or newer .* the model has opset 11; convert it first"
    ):
        _quantize(tmp_path / "old.onnx", tmp_path / "d.onnx", calib[:64], config=EFRAPConfig(iters=20))
    assert not (tmp_path / "d.onnx").exists()
    plan = quantize_static(
        tmp_path / "old.onnx",
        tmp_path / "d.onnx",
        _reader(calib[:64]),
        per_channel=False,
        config=EFRAPConfig(iters=20),
    )
    assert verify(tmp_path / "d.onnx", plan).integers_ok


def test_a_weight_from_a_constant_node_is_named_read_back_and_defended_after_pre_processing(calib, tmp_path):
    """Some exporters write a weight as a Constant node: onnxruntime's quantize_static then rounds it like
    an activation, per tensor at run time. The drop-in names it with the fix instead of calling it float,
    verify reads its run-time integers, and after quant_pre_process (quantize_images) it is a weight that
    EFRAP defends."""
    from efrap_onnx import quantize_images

    w = np.random.default_rng(0).standard_normal((4, 4, 3, 3)).astype(np.float32)
    model = graph_model(
        [
            helper.make_node("Conv", ["input", "w1"], ["c"], name="first", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w, "w2_value")),
            helper.make_node("Conv", ["r", "w2"], ["y"], name="second", pads=[1, 1, 1, 1]),
        ],
        {"input": (TensorProto.FLOAT, ["N", 1, 8, 8])},
        {"y": ["N", 4, 8, 8]},
        {"w1": (4, 1, 3, 3)},
    )
    onnx.save(model, str(tmp_path / "m.onnx"))
    plan = _quantize(tmp_path / "m.onnx", tmp_path / "d.onnx", calib[:64], config=EFRAPConfig(iters=20))
    assert list(plan.layers) == ["w1"] and list(plan.meta.skipped) == ["w2"]
    assert "comes from a Constant node" in plan.meta.skipped["w2"]
    report = verify(tmp_path / "d.onnx", plan)
    assert report.integers_ok and report.skipped == ["w2"]
    pre = quantize_images(tmp_path / "m.onnx", tmp_path / "p.onnx", calib[:64], config=EFRAPConfig(iters=20))
    assert sorted(pre.layers) == ["w1", "w2"] and verify(tmp_path / "p.onnx", pre).integers_ok


def test_the_torch_recipe_defends_a_token_model_and_exports_it_proven(tmp_path):
    """defend(model, token_ids, scheme="onnxruntime") then export_defended: ids calibrate as they are, the
    Linear is defended, and the exported file is proven with its embedding table counted as a constant
    that keeps onnxruntime's rounding."""

    from efrap_onnx import export_defended
    from efrap_plugin import defend

    torch.manual_seed(0)
    model, ids = TokenClassifier().eval(), torch.randint(0, 50, (128, 5))
    plan = defend(model, ids, scheme="onnxruntime", config=EFRAPConfig(iters=20), progress=False)
    assert list(plan.layers) == ["head"]
    keyed, report = export_defended(model, plan, ids, tmp_path / "d.onnx")
    assert report.integers_ok and report.matching == 1
    assert report.constants == ["embed.weight_quantized"] and list(keyed.meta.constants) == report.constants
