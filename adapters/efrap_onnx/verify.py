"""Proof from the artifact itself: the integers written in the file, and the kernels onnxruntime runs."""

from __future__ import annotations

import collections
import dataclasses
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from efrap_plugin import (
    DataError,
    IntegerReport,
    ModelError,
    PlanMismatchError,
    RoundingPlan,
    compare_integers,
)

from .graph import attribute, constant_node_weight, quantized_constant, zero_point_type
from .kernels import KernelCheck, check_kernels
from .model_io import initializer_array, load_onnx
from .runtime import first_line

__all__ = [
    "VerifyReport",
    "quantized_biases",
    "kernel_check",
    "optimized_op_counts",
    "quantized_weights",
    "verify",
    "weight_integers",
]

log = logging.getLogger(__name__)

INT_KERNELS = (
    "QLinearConv",
    "QGemm",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "MatMulIntegerToFloat",
)


@dataclass
class VerifyReport(IntegerReport):
    """What was read back from the written QDQ file, the kernels onnxruntime runs for it, and, where
    inputs were given, whether those kernels compute what the graph says on this CPU."""

    int_kernels: dict[str, int] = field(default_factory=dict)
    kernels: KernelCheck | None = None

    @property
    def runs_int_kernels(self) -> bool:
        """Whether onnxruntime's optimized graph runs integer kernels for every planned layer."""
        return sum(self.int_kernels.values()) >= self.layers

    def to_dict(self) -> dict:
        integers = {f.name: getattr(self, f.name) for f in dataclasses.fields(IntegerReport)}
        found = {**dataclasses.asdict(IntegerReport(**integers)), "integers_ok": self.integers_ok}
        found.update(int_kernels=dict(self.int_kernels), runs_int_kernels=self.runs_int_kernels)
        if self.kernels is not None:
            found["kernel_agreement"] = self.kernels.to_dict()
        return found


def optimized_op_counts(model_path: str | Path) -> dict[str, int]:
    """Op types of the graph onnxruntime actually executes on CPU (QDQ fused into integer kernels)."""
    with tempfile.TemporaryDirectory(prefix="efrap-verify-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(out)
        opts.log_severity_level = 3
        ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(out))
    return dict(collections.Counter(n.op_type for n in optimized.graph.node))


# Where a QOperator op may read a quantized weight or table directly (a Gemm / MatMul on either side,
# W @ x included); in QDQ every DequantizeLinear of a quantized initializer counts.
_QOPERATOR_WEIGHT_INPUTS = {
    "QLinearConv": (3,),
    "QLinearMatMul": (0, 3),
    "QGemm": (0, 3),
    "ConvInteger": (1,),
    "MatMulInteger": (0, 1),
    "Gather": (0,),
}


def quantized_weights(model: onnx.ModelProto) -> list[str]:
    """Names of every quantized initializer of the graph, QDQ or QOperator: the weights its Conv / Gemm /
    MatMul ops read as integers (stored as integers, or in float and rounded by a QuantizeLinear at run
    time), and in QDQ the other quantized constants (an embedding table, a bias an Add adds)."""
    return list(weight_integers(model))


def weight_integers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The integers each quantized initializer of the graph holds (``quantized_weights``), by name: read
    from an integer initializer, or, for a float one a QuantizeLinear rounds at run time, computed by
    onnxruntime's own QuantizeLinear on the stored float values."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    found: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        from_node = constant_node_weight(node, producers) if node.op_type == "DequantizeLinear" else None
        if from_node is not None:  # a Constant node's tensor, rounded at run time
            found[from_node] = _run_quantize_linear(model, producers[node.input[0]], inits, producers)
            continue
        name = quantized_constant(node, producers, inits) if node.op_type == "DequantizeLinear" else None
        if name is not None and name not in found:
            rounding = producers.get(node.input[0])  # a QuantizeLinear of a float initializer, or none
            found[name] = (
                initializer_array(inits[name])
                if rounding is None
                else _run_quantize_linear(model, rounding, inits, producers)
            )
        for i in _QOPERATOR_WEIGHT_INPUTS.get(node.op_type, ()):
            name = node.input[i] if i < len(node.input) else ""
            held = initializer_array(inits[name]) if name in inits else None
            if held is not None and held.dtype.kind in "iu":
                found[name] = held
    return found


@dataclass(frozen=True)
class WeightReader:
    """A node that dequantizes a quantized weight, and the grid it reads it on."""

    node: str
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    """The axis its scales run along (None: one scale)."""


# QOperator ops: (integers input, its scale input, its zero point input, the axis per-channel scales run
# along: a number, or "transB" for a Gemm's B, whose output channels are its rows only when transposed)
_QOPERATOR_GRIDS = {
    "QLinearConv": ((3, 4, 5, 0),),
    "QLinearMatMul": ((0, 1, 2, 0), (3, 4, 5, -1)),
    "QGemm": ((0, 1, 2, 0), (3, 4, 5, "transB")),
}


def weight_readers(model: onnx.ModelProto) -> dict[str, list[WeightReader]]:
    """For each quantized initializer, every node that dequantizes it and the scale, zero point and axis
    that node reads: followed through the graph, not looked up by name, so a rewired scale is seen.
    (MatMulInteger / ConvInteger apply their scales in later nodes, and are not listed.)"""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    found: dict[str, list[WeightReader]] = {}
    for node in model.graph.node:
        label = node.name or node.output[0]
        if node.op_type == "DequantizeLinear":
            name = constant_node_weight(node, producers) or quantized_constant(node, producers, inits)
            if name is None:
                continue
            scale = _constant(node.input[1], inits, producers)
            zp = _constant(node.input[2], inits, producers) if len(node.input) > 2 and node.input[2] else None
            if scale is None:
                continue
            axis = int(attribute(node, "axis", 1)) if scale.size > 1 else None
            found.setdefault(name, []).append(
                WeightReader(label, scale, np.zeros(1, np.int64) if zp is None else zp, axis)
            )
        for ints, s, z, along in _QOPERATOR_GRIDS.get(node.op_type, ()):
            name = node.input[ints] if ints < len(node.input) else ""
            if name not in inits or initializer_array(inits[name]).dtype.kind not in "iu":
                continue
            scale = _constant(node.input[s], inits, producers)
            zp = _constant(node.input[z], inits, producers) if z < len(node.input) and node.input[z] else None
            if scale is not None:
                if along == "transB":
                    along = 0 if attribute(node, "transB", 0) else 1
                rank = initializer_array(inits[name]).ndim
                axis = int(along) % max(rank, 1) if scale.size > 1 else None
                found.setdefault(name, []).append(
                    WeightReader(label, scale, np.zeros(1, np.int64) if zp is None else zp, axis)
                )
    return found


def quantized_biases(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each int32 initializer a DequantizeLinear reads (onnxruntime's ``<bias>_quantized``), by name:
    its integers, scale and zero point as that node reads them."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    found = {}
    for node in model.graph.node:
        name = node.input[0] if node.op_type == "DequantizeLinear" else ""
        if name not in inits or inits[name].data_type != onnx.TensorProto.INT32:
            continue
        scale = _constant(node.input[1], inits, producers)
        zp = _constant(node.input[2], inits, producers) if len(node.input) > 2 and node.input[2] else None
        if scale is not None:
            found[name] = (initializer_array(inits[name]), scale, np.zeros(1) if zp is None else zp)
    return found


def _biases_off_their_grid(
    biases: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], float_model: onnx.ModelProto
) -> list[str]:
    """The quantized biases whose dequantized values are not the float bias rounded on their grid (half a
    step, with float32's slack); one whose float bias the model lacks is off too."""
    floats = {t.name: t for t in float_model.graph.initializer}
    off = []
    for name, (ints, scale, zp) in biases.items():
        source = floats.get(name[: -len("_quantized")] if name.endswith("_quantized") else name)
        if source is None:
            off.append(name)
            continue
        want = initializer_array(source).astype(np.float64)
        got = (ints.astype(np.float64) - zp.astype(np.float64)) * scale.astype(np.float64)
        step = np.broadcast_to(np.abs(scale.astype(np.float64)), got.shape)
        if got.shape != want.shape or np.any(np.abs(got - want) > step / 2 + 1e-6 * (np.abs(want) + step)):
            off.append(name)
    return off


def _constant(name: str, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]):
    """The value of an initializer or a Constant node's tensor; None for a computed tensor."""
    if name in inits:
        return np.asarray(initializer_array(inits[name]))
    node = producers.get(name)
    if node is not None and node.op_type == "Constant" and node.attribute:
        return np.asarray(onnx.numpy_helper.to_array(node.attribute[0].t))
    return None


def _run_quantize_linear(
    model: onnx.ModelProto,
    q: onnx.NodeProto,
    inits: dict[str, onnx.TensorProto],
    producers: dict[str, onnx.NodeProto],
) -> np.ndarray:
    """One QuantizeLinear of ``model``, run alone by onnxruntime on the initializers (or Constant nodes)
    it reads."""
    out_type = zero_point_type(q.input[2] if len(q.input) > 2 else "", inits)
    graph = helper.make_graph(
        [*(producers[n] for n in q.input if n and n not in inits), q],
        "quantize_linear",
        [],
        [helper.make_tensor_value_info(q.output[0], out_type, None)],
        [inits[name] for name in q.input if name in inits],
    )
    alone = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    sess = ort.InferenceSession(alone.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {})[0])


def verify(
    model_path: str | Path,
    plan: RoundingPlan,
    strict: bool = True,
    inputs: np.ndarray | Mapping[str, np.ndarray] | None = None,
    float_model: str | Path | onnx.ModelProto | None = None,
) -> VerifyReport:
    """Compare the weight integers stored in ``model_path`` with ``plan``, bit for bit.

    Every quantized weight of the file must be in the plan and hold its integers: a layer the plan
    lacks, or an empty plan, fails. With ``strict`` a failure raises PlanMismatchError naming the layers.
    With ``float_model`` (the float ONNX model it was quantized from), every quantized bias must be that
    model's bias rounded on its own grid; without it, the report names them ``unchecked``.
    With ``inputs`` (the calibration or evaluation inputs), the report also says whether onnxruntime's
    fused kernels on this CPU compute what the graph says (``check_kernels``); a disagreement is logged
    as a warning, not raised: the file is right, this CPU runs it differently.
    """
    if plan.source != "onnx" or plan.meta.layout is None:
        raise PlanMismatchError(
            "verify: the plan has no ONNX layout; pass the plan returned by efrap_onnx.quantize_static or "
            "export_defended"
        )
    model = load_onnx(model_path, check_finite=False)
    stored, scales, zero_points, axes = _read_layers(model, plan)
    check = compare_integers(
        plan, stored, scales, strict=False, where=str(model_path), zero_points=zero_points
    )
    check.grid_mismatches.update(axes)
    biases = quantized_biases(model)
    if float_model is None:
        check.unchecked.extend(sorted(biases))
    else:
        source = float_model if isinstance(float_model, onnx.ModelProto) else load_onnx(float_model)
        check.bias_mismatches.extend(_biases_off_their_grid(biases, source))
    if strict:
        check.check(plan, str(model_path), len(stored))
    kernels = None if inputs is None else kernel_check(model, inputs)
    return VerifyReport(
        **{f.name: getattr(check, f.name) for f in dataclasses.fields(IntegerReport)},
        int_kernels={k: v for k, v in optimized_op_counts(model_path).items() if k in INT_KERNELS},
        kernels=kernels,
    )


def _read_layers(model: onnx.ModelProto, plan: RoundingPlan) -> tuple[dict, dict, dict, dict[str, str]]:
    """Each quantized weight's integers (in the plan's layout), and the scales, zero points and channel
    axis the nodes that read them dequantize with: every reader must hold the plan's grid, whatever
    initializer names the plan recorded. Returns integers, scales, zero points and axis problems by layer."""
    inits = {t.name: t for t in model.graph.initializer}
    layout = plan.meta.layout
    planned = {where["quantized"]: name for name, where in layout.items()}
    readers = weight_readers(model)
    stored, scales, zero_points, axes = {}, {}, {}, {}
    for quantized, held in weight_integers(model).items():
        name = planned.get(quantized, quantized)
        ints = torch.from_numpy(held.astype(np.int32))
        stored[name] = ints.transpose(0, 1) if name in layout and layout[name]["transpose"] else ints
        if name not in layout:
            continue
        want = plan.layers.get(name)
        channel_axis = 1 if layout[name]["transpose"] else 0
        for reader in readers.get(quantized, []):
            scale = torch.from_numpy(np.atleast_1d(reader.scale).astype(np.float32))
            zp = torch.from_numpy(np.atleast_1d(reader.zero_point).astype(np.int64))
            if name not in scales or (
                want is not None and not torch.equal(scale.flatten(), want.scale.flatten())
            ):
                scales[name] = scale  # the first reader's, or one that differs from the plan
            if name not in zero_points or (
                want is not None and not torch.equal(zp.flatten(), want.zero_point.to(torch.int64).flatten())
            ):
                zero_points[name] = zp
            if reader.axis is not None and reader.axis % max(held.ndim, 1) != channel_axis:
                axes[name] = f"scales along axis {reader.axis} in {reader.node}, planned along {channel_axis}"
        if not readers.get(quantized) and layout[name]["scale"] in inits:  # MatMulInteger / ConvInteger
            scales[name] = torch.from_numpy(
                np.atleast_1d(initializer_array(inits[layout[name]["scale"]])).astype(np.float32)
            )
    return stored, scales, zero_points, axes


def kernel_check(
    model: onnx.ModelProto | str | Path, inputs: np.ndarray | Mapping[str, np.ndarray]
) -> KernelCheck:
    """``check_kernels`` with the library's errors for bad inputs, and its verdict logged."""
    try:
        found = check_kernels(model, inputs)
    except ValueError as exc:
        raise DataError(f"kernel check: {exc}") from None
    except Exception as exc:  # onnxruntime's pybind errors share no public base class
        raise ModelError(
            f"kernel check: onnxruntime {ort.__version__} cannot run the model ({first_line(exc)})"
        ) from None
    (log.debug if found.ok else log.warning)(found.summary())
    return found
