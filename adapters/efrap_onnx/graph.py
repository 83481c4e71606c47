"""The quantized layers of a QDQ graph, and the torch function each one computes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from efrap_plugin import ModelError, on_device_of

from .model_io import Prepared, initializer_array, prepare

__all__ = [
    "INTEGER_BITS",
    "QuantizedLayer",
    "attribute",
    "constant_node_weight",
    "find_quantized_layers",
    "folded_weights",
    "quantized_constant",
    "weight_source",
    "zero_point_type",
]

log = logging.getLogger(__name__)


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
"""The ops whose second input quantize_static quantizes as a weight, and EFRAP learns."""


def channels_on_axis_1(node: onnx.NodeProto) -> bool:
    """Whether the node's weight holds its output channels on axis 1 (x @ W's K x N, a Gemm without
    transB, a ConvTranspose's C_in x C_out / group x ...): the axis onnxruntime's per-channel scales run
    along, moved first for the core."""
    return node.op_type in ("MatMul", "ConvTranspose") or (
        node.op_type == "Gemm" and not attribute(node, "transB", 0)
    )


@dataclass
class QuantizedLayer:
    """A Conv / ConvTranspose / Gemm / MatMul whose weight a DequantizeLinear feeds from a quantized initializer, or, where
    onnxruntime kept the weight in float (extra_options AddQDQPairToWeight), from a QuantizeLinear that
    rounds that float initializer at run time (``rounded_at_run_time``: ``quantized`` names it)."""

    node: str
    op_type: str
    float_weight: str
    quantized: str
    scale: str
    zero_point: str
    axis: int
    transpose: bool  # output channels on axis 1 (a MatMul's or Gemm's K x N, a ConvTranspose's C_in x C_out):
    # the core sees the weight with its first two axes swapped
    input_name: str
    output_name: str
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    rounded_at_run_time: bool = False


def folded_weights(model: str | Path | onnx.ModelProto | Prepared) -> dict[str, torch.Tensor]:
    """Conv / ConvTranspose / Gemm / MatMul weights (output channels on axis 0) as quantize_static sees them: after
    quant_pre_process has folded BatchNorm. A loaded model is checked, not parsed again; a prepared one
    (``prepare``) is read as it is."""
    pre = (model if isinstance(model, Prepared) else prepare(model)).model
    inits = _initializers(pre)
    weights = {}
    for node in pre.graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in inits:
            arr = initializer_array(inits[node.input[1]]).astype(np.float32)
            swap = channels_on_axis_1(node)
            weights[node.input[1]] = torch.from_numpy(
                np.ascontiguousarray(np.swapaxes(arr, 0, 1) if swap else arr)
            )
    return weights


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _relu_after(float_model: onnx.ModelProto, tensor: str) -> str | None:
    """The output of a Relu that is the only consumer of ``tensor``, if there is one."""
    users = [n for n in float_model.graph.node if tensor in n.input]
    graph_outputs = {o.name for o in float_model.graph.output}
    if len(users) == 1 and users[0].op_type == "Relu" and tensor not in graph_outputs:
        return users[0].output[0]
    return None


@dataclass(frozen=True)
class _Graphs:
    """The QDQ graph and the float graph it was quantized from, indexed for matching their layers."""

    qdq: onnx.ModelProto
    float_model: onnx.ModelProto
    inits: dict[str, onnx.TensorProto]
    float_inits: dict[str, onnx.TensorProto]
    producers: dict[str, onnx.NodeProto]
    float_by_weight: dict[str, onnx.NodeProto]
    float_by_name: dict[str, onnx.NodeProto]

    @classmethod
    def of(cls, qdq: onnx.ModelProto, float_model: onnx.ModelProto) -> _Graphs:
        float_inits = _initializers(float_model)
        # matched by structure, through the weight: onnxruntime stores float weight W as W_quantized, and a
        # node's name is optional in ONNX (an unnamed Conv must be defended all the same)
        float_by_weight = {
            n.input[1]: n
            for n in float_model.graph.node
            if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in float_inits
        }
        return cls(
            qdq,
            float_model,
            _initializers(qdq),
            float_inits,
            {out: n for n in qdq.graph.node for out in n.output},
            float_by_weight,
            {n.name: n for n in float_model.graph.node if n.name},
        )


def find_quantized_layers(
    qdq: onnx.ModelProto, float_model: onnx.ModelProto, include_relu: bool = True
) -> tuple[list[QuantizedLayer], dict[str, str], dict[str, str]]:
    """Quantized layers in graph order; the weights left alone with the reason (quantized ones keyed
    by their quantized initializer, as verify reads them; float ones by node); and every other quantized
    constant (an Add's bias, a norm's scale, a lookup table) with its readers: nothing quantized goes
    unaccounted for.

    With ``include_relu`` a layer followed only by a Relu is preserved at the Relu's output (the
    reference's unit: Conv/Linear + its activation), so errors on negative outputs cost nothing.
    """
    graphs = _Graphs.of(qdq, float_model)
    layers, skipped = [], {}
    for node in qdq.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        if node.op_type in ("Gemm", "MatMul"):  # a weight on the left, W @ x: quantized all the same
            left, _ = weight_source(graphs.producers.get(node.input[0]), graphs.producers, graphs.inits)
            if left is not None:
                skipped[left] = (
                    f"{node.op_type} {node.name or node.output[0]}: weight as its first input (W @ x), a form "
                    "EFRAP does not model; left at nearest rounding"
                )
        found = _layer_at(node, graphs, include_relu)
        if isinstance(found, QuantizedLayer):
            layers.append(found)
        elif found is not None:
            skipped[found[0]] = found[1]
    constants = _other_quantized_constants(
        qdq, graphs.producers, graphs.inits, {layer.quantized for layer in layers} | set(skipped)
    )
    return layers, skipped, constants


def _layer_at(
    node: onnx.NodeProto, graphs: _Graphs, include_relu: bool
) -> QuantizedLayer | tuple[str, str] | None:
    """The layer a weight node of the QDQ graph is, or (the key it is skipped under, why), or None
    for a node with nothing quantized to account for."""
    where = f"{node.op_type} {node.name or node.output[0]}"
    dq = graphs.producers.get(node.input[1])
    stored, at_run_time = weight_source(dq, graphs.producers, graphs.inits)
    from_node = constant_node_weight(dq, graphs.producers)
    if from_node is not None:  # keyed like verify reads it: the Constant's output
        return from_node, (
            f"{where}: its weight comes from a Constant node, which onnxruntime quantizes like an activation "
            "(per tensor, at run time); make it an initializer (quant_pre_process does) to have it "
            "quantized as a weight and defended"
        )
    if stored is None:
        if node.op_type in ("Conv", "ConvTranspose") or node.input[1] in graphs.float_inits:
            return node.name or node.output[0], "not quantized by onnxruntime: stays in float"
        return None
    if stored in graphs.float_inits and not at_run_time:
        return stored, (
            f"{where}: its weight is integers already in the model given (quantized before quantize_static), "
            "so there is no float weight whose rounding EFRAP could choose; left as given"
        )
    fnode = graphs.float_by_weight.get(stored.removesuffix("_quantized")) or graphs.float_by_name.get(
        node.name
    )
    forward = (
        _forward(node, fnode, graphs.float_inits)
        if fnode is not None and fnode.input[1] in graphs.float_inits
        else None
    )
    if forward is None:
        return stored, f"{where}: a form EFRAP does not model; left at nearest rounding"
    transpose = channels_on_axis_1(node)
    axis = _channel_axis(dq, graphs.inits, len(graphs.inits[stored].dims))
    if axis is not None and axis != (1 if transpose else 0):
        return stored, (
            f"{where}: per-channel scales along axis {axis}, its input channels; EFRAP learns grids per "
            "output channel; left at nearest rounding"
        )
    output = fnode.output[0]
    relu = _relu_after(graphs.float_model, output) if include_relu else None
    if relu is not None:
        forward, output = (lambda f: lambda x, w: torch.relu(f(x, w)))(forward), relu
    return QuantizedLayer(
        node.name or node.output[0],
        node.op_type,
        fnode.input[1],
        stored,
        dq.input[1],
        dq.input[2] if len(dq.input) > 2 else "",
        attribute(dq, "axis", 1),
        transpose,
        node.input[0],
        output,
        forward,
        at_run_time,
    )


INTEGER_BITS = {
    onnx.TensorProto.INT4: 4,
    onnx.TensorProto.UINT4: 4,
    onnx.TensorProto.INT8: 8,
    onnx.TensorProto.UINT8: 8,
    onnx.TensorProto.INT16: 16,
    onnx.TensorProto.UINT16: 16,
}
"""The integer types a quantized weight or constant is stored in (int32 is a bias's), and their bits."""


def zero_point_type(zero_point: str, inits: dict[str, onnx.TensorProto]) -> int:
    """The integer type a QuantizeLinear / DequantizeLinear with this zero point writes / reads (uint8
    without one, as ONNX defines)."""
    return inits[zero_point].data_type if zero_point in inits else onnx.TensorProto.UINT8


def quantized_constant(
    dq: onnx.NodeProto, producers: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto]
) -> str | None:
    """The initializer a DequantizeLinear reads if it is a quantized weight or constant (stored in a
    narrow integer type, or in float and rounded by a QuantizeLinear at run time); None otherwise."""
    stored, at_run_time = weight_source(dq, producers, inits)
    if stored is None:
        return None
    if at_run_time:
        rounding = producers[dq.input[0]]
        integer_type = zero_point_type(rounding.input[2] if len(rounding.input) > 2 else "", inits)
    else:
        integer_type = inits[stored].data_type
    return stored if integer_type in INTEGER_BITS else None


def _other_quantized_constants(
    qdq: onnx.ModelProto,
    producers: dict[str, onnx.NodeProto],
    inits: dict[str, onnx.TensorProto],
    accounted: set[str],
) -> dict[str, str]:
    """Every quantized initializer of the graph not in ``accounted`` (weights learned or skipped), with the
    nodes that read it."""
    constants: dict[str, str] = {}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in qdq.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for node in qdq.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        # a Constant node's tensor a QuantizeLinear rounds at run time (a scalar an exporter wrote as a
        # node, such as GELU's 0.5) counts as verify reads it, by the Constant's output name
        stored = constant_node_weight(node, producers) or quantized_constant(node, producers, inits)
        if stored is None or stored in accounted:
            continue
        users = ", ".join(f"{n.op_type} {n.name or n.output[0]}" for n in readers.get(node.output[0], []))
        constants[stored] = f"read by {users or 'no node'}"
    return constants


def _channel_axis(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto], rank: int) -> int | None:
    """The weight axis a per-channel DequantizeLinear's scales run along (None: one scale)."""
    scale = inits.get(dq.input[1])
    if scale is None or int(np.prod(scale.dims)) <= 1:
        return None
    return attribute(dq, "axis", 1) % rank


def constant_node_weight(dq: onnx.NodeProto | None, producers: dict[str, onnx.NodeProto]) -> str | None:
    """The output of a Constant node that a QuantizeLinear rounds at run time into this DequantizeLinear
    (a weight some exporters write as a node, not an initializer); None otherwise."""
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = producers.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    source = producers.get(q.input[0])
    return q.input[0] if source is not None and source.op_type == "Constant" else None


def weight_source(
    dq: onnx.NodeProto | None, producers: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto]
) -> tuple[str | None, bool]:
    """The initializer a weight's DequantizeLinear reads: an integer one, or the float one a
    QuantizeLinear rounds at run time (True); None where no DequantizeLinear of an initializer feeds it."""
    if dq is None or dq.op_type != "DequantizeLinear":
        return None, False
    if dq.input[0] in inits:
        return dq.input[0], False
    q = producers.get(dq.input[0])
    if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in inits:
        return q.input[0], True
    return None, False


def _bias(
    fnode: onnx.NodeProto, index: int, inits: dict[str, onnx.TensorProto]
) -> torch.Tensor | None | bool:
    if len(fnode.input) <= index or not fnode.input[index]:
        return None
    if fnode.input[index] not in inits:
        return False
    return torch.from_numpy(np.array(initializer_array(inits[fnode.input[index]]), dtype=np.float32))


def _auto_pad(node: onnx.NodeProto) -> str:
    """A Conv's or ConvTranspose's auto_pad, as text (NOTSET when absent)."""
    value = attribute(node, "auto_pad", b"NOTSET")
    return value.decode() if isinstance(value, bytes) else value


def _same_pads(spatial, kernel, strides, dilations, auto_pad: str) -> list[int]:
    """F.pad's list (last axis first) for ONNX's SAME_UPPER / SAME_LOWER: the output is ceil(input /
    stride) long, the odd padding element at the end (UPPER) or the start (LOWER)."""
    out = []
    for n, k, s, d in reversed(list(zip(spatial, kernel, strides, dilations, strict=True))):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small, big = total // 2, total - total // 2
        out += [small, big] if auto_pad == "SAME_UPPER" else [big, small]
    return out


def _forward(node: onnx.NodeProto, fnode: onnx.NodeProto, inits) -> Callable | None:
    """(x, w in [out, ...] layout) -> the node's output; None where the node is outside what we model."""
    if node.op_type == "Conv":
        bias, auto_pad = _bias(fnode, 2, inits), _auto_pad(node)
        if bias is False or auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
            return None
        rank = len(inits[fnode.input[1]].dims) - 2  # kernel_shape is optional: the weight says it
        if rank not in (1, 2):
            return None
        strides = attribute(node, "strides", [1] * rank)
        dilations = attribute(node, "dilations", [1] * rank)
        pads = attribute(node, "pads", [0] * (2 * rank)) if auto_pad == "NOTSET" else [0] * (2 * rank)
        group = attribute(node, "group", 1)
        conv = F.conv1d if rank == 1 else F.conv2d
        symmetric = list(pads[:rank]) == list(pads[rank:])
        torch_pad = [p for i in reversed(range(rank)) for p in (pads[i], pads[i + rank])]

        def run_conv(x, w):
            padding: list[int] | int = list(pads[:rank]) if symmetric else 0
            if auto_pad.startswith("SAME"):
                x, padding = F.pad(x, _same_pads(x.shape[2:], w.shape[2:], strides, dilations, auto_pad)), 0
            elif not symmetric:
                x = F.pad(x, torch_pad)
            return conv(x, w, on_device_of(bias, x), strides, padding, dilations, group)

        return run_conv
    if node.op_type == "ConvTranspose":
        return _conv_transpose(node, fnode, inits)
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0):
            return None
        bias = _bias(fnode, 2, inits)
        if bias is False:
            return None
        alpha, beta = attribute(node, "alpha", 1.0), attribute(node, "beta", 1.0)

        def run_gemm(x, w):
            y = alpha * (x @ w.T)
            return y + beta * on_device_of(bias, x) if bias is not None else y

        return run_gemm
    if node.op_type == "MatMul":
        if len(inits[fnode.input[1]].dims) != 2:  # a batched (3-D or more) constant: not a Linear
            return None
        return lambda x, w: x @ w.T
    raise ModelError(f"node {node.name!r}: unexpected op {node.op_type}")


def _conv_transpose(node: onnx.NodeProto, fnode: onnx.NodeProto, inits) -> Callable | None:
    """A ConvTranspose as torch computes it: the weight back in its C_in x C_out / group layout, ONNX's
    (possibly uneven) pads cropped from the full output. An output_shape or auto_pad (pads onnxruntime
    works out at run time) is outside what we model."""
    bias = _bias(fnode, 2, inits)
    rank = len(inits[fnode.input[1]].dims) - 2
    if bias is False or _auto_pad(node) != "NOTSET" or attribute(node, "output_shape") or rank not in (1, 2):
        return None
    strides = list(attribute(node, "strides", [1] * rank))
    dilations = list(attribute(node, "dilations", [1] * rank))
    pads = list(attribute(node, "pads", [0] * (2 * rank)))
    extra = list(attribute(node, "output_padding", [0] * rank))
    if any(e >= max(s, d) for e, s, d in zip(extra, strides, dilations, strict=True)):
        return None  # torch refuses an output padding this large; onnxruntime's output is ill-defined
    group = attribute(node, "group", 1)
    deconv = F.conv_transpose1d if rank == 1 else F.conv_transpose2d

    def run_conv_transpose(x, w):
        y = deconv(x, w.transpose(0, 1), on_device_of(bias, x), strides, 0, extra, group, dilations)
        crop = [slice(None), slice(None)] + [
            slice(pads[i], y.shape[2 + i] - pads[i + rank]) for i in range(rank)
        ]
        return y[tuple(crop)]

    return run_conv_transpose
