"""Each preset reproduces its backend's scales and nearest integers bit for bit (the backend is asked)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from efrap_plugin import EFRAPError, QuantScheme, scheme_preset


def _weights(kind: str, clean_cnn=None) -> torch.Tensor:
    if kind == "trained":
        return clean_cnn.features[1][0].weight.detach().clone()
    torch.manual_seed(1)
    w = torch.randn(16, 8, 3, 3) * 0.05
    w[3] = 0.0  # a dead channel: degenerate range
    w[5, 0, 0, 0] = -0.4  # a negative abs-max
    return w


def _ort_quantize(w: torch.Tensor, tmp_path, weight_type, per_channel=True):
    from onnxruntime.quantization import QuantType

    from efrap_onnx import ListDataReader, quantize_static

    cin = w.shape[1]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[0], 6, 6])],
        [numpy_helper.from_array(w.numpy(), "w")],
    )
    src = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    x = np.random.default_rng(0).random((8, cin, 6, 6), dtype=np.float32)
    out = tmp_path / "q.onnx"
    quantize_static(
        src,
        out,
        ListDataReader.from_array("x", x),
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=weight_type,
        efrap=False,
        progress=False,
    )
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    return torch.from_numpy(inits["w_quantized"].astype(np.int32)), torch.from_numpy(
        np.atleast_1d(inits["w_scale"])
    )


@pytest.mark.parametrize("kind", ["random", "trained"])
@pytest.mark.parametrize("bits,per_channel", [(8, True), (8, False), (4, True)])
def test_onnxruntime_preset_matches_quantize_static(kind, bits, per_channel, clean_cnn, tmp_path):
    from onnxruntime.quantization import QuantType

    w = _weights(kind, clean_cnn)
    ints, scale = _ort_quantize(w, tmp_path, QuantType.QInt8 if bits == 8 else QuantType.QInt4, per_channel)
    scheme = QuantScheme.onnxruntime(bits, per_channel)
    s, z = scheme.qparams(w)
    assert torch.equal(s, scale)
    assert torch.equal(scheme.quantize(w, s, z), ints)


@pytest.mark.parametrize("kind", ["random", "trained"])
def test_torchao_x86_preset_matches_observer_and_kernel(kind, clean_cnn):
    from torchao.quantization.pt2e.observer import PerChannelMinMaxObserver

    w = _weights(kind, clean_cnn)
    obs = PerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-128, quant_max=127
    )
    obs(w)
    scale, zp = obs.calculate_qparams()
    ints = torch.quantize_per_channel(w, scale, zp, 0, torch.qint8).int_repr().to(torch.int32)
    scheme = QuantScheme.torchao_x86(8)
    s, z = scheme.qparams(w)
    assert torch.equal(s, scale)
    assert torch.equal(scheme.quantize(w, s, z), ints)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("kind", ["random", "trained"])
def test_brevitas_preset_matches_quant_conv(kind, per_channel, clean_cnn):
    import brevitas.nn as qnn
    from brevitas.quant import Int8WeightPerChannelFloat, Int8WeightPerTensorFloat

    w = _weights(kind, clean_cnn)
    if kind == "random":
        w = w.clone()
        w[3] = 0.01  # Brevitas clamps a zero range to its own minimum scale; keep the channel alive
    quant = Int8WeightPerChannelFloat if per_channel else Int8WeightPerTensorFloat
    conv = qnn.QuantConv2d(w.shape[1], w.shape[0], 3, bias=False, weight_quant=quant)
    with torch.no_grad():
        conv.weight.copy_(w)
    qt = conv.quant_weight()
    scheme = QuantScheme.brevitas(8, per_channel)
    s, z = scheme.qparams(w)
    assert torch.equal(s, qt.scale.flatten())
    assert torch.equal(scheme.quantize(w, s, z), qt.int().to(torch.int32))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=2, max_size=40),
    st.sampled_from(["onnxruntime", "torchao-x86", "brevitas-int8", "reference"]),
    st.integers(2, 8),
)
def test_nearest_integers_stay_in_range_and_within_half_a_step(values, name, bits):
    w = torch.tensor(values, dtype=torch.float32).reshape(1, -1)
    scheme = scheme_preset(name, bits)
    s, z = scheme.qparams(w)
    q = scheme.quantize(w, s, z)
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
    err = (scheme.dequantize(q, s, z) - w).abs()
    inside = (q > scheme.qmin) & (q < scheme.qmax)
    assert bool((err[inside] <= s.reshape(-1, 1).expand_as(w)[inside] * 0.5 * (1 + 1e-5)).all())


def test_reference_preset_is_affine_with_8bit_edges():
    scheme = QuantScheme.reference(4)
    assert (scheme.qmin, scheme.qmax, scheme.range_rule) == (0, 15, "mse")
    assert scheme.for_layer("first").bits == 8 and scheme.for_layer("first").qmax == 255
    assert scheme.for_layer("middle") is scheme
    w = torch.randn(4, 10)
    s, z = scheme.qparams(w)
    q = scheme.quantize(w, s, z)
    assert int(q.min()) >= 0 and int(q.max()) <= 15 and int(z.min()) >= 0


def test_scheme_json_round_trip():
    scheme = QuantScheme.torchao_x86(4)
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_bits_out_of_range_is_a_clear_error(bits):
    with pytest.raises(EFRAPError, match=rf"bits: expected an integer in 2\.\.8 \(--bits\), got {bits}"):
        QuantScheme.onnxruntime(bits)


def test_unknown_scheme_name_lists_the_presets():
    with pytest.raises(EFRAPError, match=r"scheme: expected one of \['brevitas-int8', 'onnxruntime'"):
        scheme_preset("tensorrt")
