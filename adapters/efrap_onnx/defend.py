"""EFRAP on a QDQ model: each quantized weight becomes a LayerProblem (inputs read from the QDQ graph
as it stands, targets from the float graph) for the core's one per-layer loop, and the learned integers
are written into the weight initializers. Scales and zero points stay onnxruntime's own."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from efrap_plugin import (
    EFRAPConfig,
    EFRAPError,
    HeldOut,
    LayerPlan,
    QuantScheme,
    RoundingPlan,
    grid_record,
    run,
    take_rows,
)
from efrap_plugin.producer import FoundLayers, Honours, LayerProblem, ProducedPlan

from .graph import INTEGER_BITS, QuantizedLayer, find_quantized_layers, zero_point_type
from .model_io import initializer_array
from .runtime import run_output, session

__all__ = [
    "QDQProducer",
    "WeightOptions",
    "defend_qdq",
    "write_float_grid",
    "pin_weight_grids",
    "weight_scheme",
    "write_plan",
]

log = logging.getLogger(__name__)

_QDQ = "the QDQ model onnxruntime's quantize_static wrote (its stock output, before any EFRAP rounding)"


def _to_core(arr: np.ndarray, layer: QuantizedLayer) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.transpose(0, 1).contiguous() if layer.transpose else t


def _as_float32(t: torch.Tensor) -> torch.Tensor:
    """A float16 graph's activations in float32, the precision the core learns in."""
    return t.float() if t.is_floating_point() and t.dtype != torch.float32 else t


def _inputs_at(batches: list[dict[str, np.ndarray]], idx: torch.Tensor) -> list[dict[str, np.ndarray]]:
    """The calibration inputs at sorted, distinct ``idx`` (counted across batches), as batches."""
    picked, seen = [], 0
    for b in batches:
        n = len(next(iter(b.values())))
        local = idx[(idx >= seen) & (idx < seen + n)] - seen
        if len(local):
            picked.append({k: take_rows(v, local) for k, v in b.items()})
        seen += n
    return picked


def _held_out(
    float_model: onnx.ModelProto, qdq: onnx.ModelProto, held: list[dict[str, np.ndarray]]
) -> HeldOut:
    """Budget mode: the float graph's first output on the held-out inputs, and the QDQ graph's as it
    stands (the learned integers written so far, the rest onnxruntime's)."""
    name = float_model.graph.output[0].name
    return HeldOut(
        run_output(session(float_model), held, name, "the float model"),
        lambda: run_output(session(qdq, exact=True), held, qdq.graph.output[0].name, _QDQ),
    )


@dataclass(frozen=True)
class WeightOptions:
    """The quantize_static arguments that decide a weight's integer range, as onnxruntime reads them."""

    reduce_range: bool = False
    symmetric: bool | None = None  # extra_options["WeightSymmetric"]; None: signed types are symmetric
    overrides: Mapping[str, Any] = field(default_factory=dict)  # extra_options["TensorQuantOverrides"]


def weight_scheme(
    name: str, data_type: int, per_channel: bool, options: WeightOptions, where: str
) -> QuantScheme:
    """The grid onnxruntime rounded weight ``name`` to: its stored type, with the reduce-range and
    symmetry rules of onnxruntime's own get_qmin_qmax_for_qType, per-tensor overrides included."""
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    if data_type not in INTEGER_BITS:
        raise EFRAPError(
            f"{where}: weights stored as {TensorProto.DataType.Name(data_type)}; EFRAP learns integer grids "
            "(QInt4 / QUInt4 / QInt8 / QUInt8 / QInt16 / QUInt16 weight_type)"
        )
    override = (options.overrides.get(name) or [{}])[0]
    reduce_range = bool(override.get("reduce_range", options.reduce_range))
    symmetric = override.get("symmetric", options.symmetric)
    if symmetric is None:
        symmetric = data_type in (TensorProto.INT4, TensorProto.INT8, TensorProto.INT16)
    qmin, qmax = (int(v) for v in get_qmin_qmax_for_qType(data_type, reduce_range, bool(symmetric)))
    rule = "absmax" if symmetric and qmin < 0 else "minmax"
    return QuantScheme(
        name="onnxruntime",
        bits=INTEGER_BITS[data_type],
        qmin=qmin,
        qmax=qmax,
        per_channel=per_channel,
        range_rule=rule,
        scale_precision="float64",
        learns_conv_transpose=True,
    )


def _problems(
    float_model: onnx.ModelProto,
    qdq: onnx.ModelProto,
    layers: list[QuantizedLayer],
    calib: list[dict[str, np.ndarray]],
    grids: dict[str, QuantScheme],
) -> Iterator[LayerProblem]:
    """One problem per quantized weight of ``qdq``, its inputs read from the QDQ graph as it stands
    (earlier layers' learned integers already written), its targets from the float graph."""
    inits = {t.name: t for t in qdq.graph.initializer}
    float_inits = {t.name: t for t in float_model.graph.initializer}
    for layer in layers:
        weight = _to_core(initializer_array(float_inits[layer.float_weight]).astype(np.float32), layer)
        scale = torch.from_numpy(np.atleast_1d(initializer_array(inits[layer.scale])).astype(np.float32))
        zp = (
            np.atleast_1d(initializer_array(inits[layer.zero_point])).astype(np.int32)
            if layer.zero_point
            else np.zeros(scale.shape, np.int32)
        )

        def install(integers: torch.Tensor, layer=layer, scale=scale, zp=zp) -> None:
            ints = (integers.transpose(0, 1) if layer.transpose else integers).numpy()
            if layer.rounded_at_run_time:
                write_float_grid(inits[layer.quantized], ints, scale.numpy(), zp, layer.axis)
            else:
                _write_integers(inits[layer.quantized], ints)

        yield LayerProblem(
            layer.float_weight,
            weight,
            grids[layer.float_weight],
            layer.forward,
            _as_float32(
                run_output(session(qdq, [layer.input_name], exact=True), calib, layer.input_name, _QDQ)
            ),
            _as_float32(
                run_output(
                    session(float_model, [layer.output_name]), calib, layer.output_name, "the float model"
                )
            ),
            scale,
            torch.from_numpy(zp),
            install=install,
        )


class QDQProducer:
    """The drop-in's producer: the QDQ graph onnxruntime's quantize_static wrote, read in the exact
    arithmetic (the same on every CPU) as the partially quantized model, and the float graph for the
    targets. The learned integers are written into ``qdq``'s weight initializers, in place."""

    source = "onnx"
    flow = "onnxruntime"
    honours = Honours(
        layer_inputs=("quantized",),
        units=("activation", "layer"),
        why_not={
            "layer_inputs": "a layer's inputs are read from the QDQ graph onnxruntime wrote, the partially "
            "quantized model; the float or mixed inputs are offered by the torch routes"
        },
    )

    def __init__(self, float_model: onnx.ModelProto, qdq: onnx.ModelProto, options: WeightOptions) -> None:
        self.float_model, self.qdq, self.options = float_model, qdq, options
        self.layers: list[QuantizedLayer] = []
        self.grids: dict[str, QuantScheme] = {}

    def running(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # ``qdq`` is the drop-in's own output, written only when learned

    def calibration(self, data: list[dict[str, np.ndarray]], rows: int) -> list[dict[str, np.ndarray]]:
        return data  # read from the user's reader by the drop-in, up to the rows the config needs

    def rows(self, calib: list[dict[str, np.ndarray]]) -> int:
        return sum(len(next(iter(b.values()))) for b in calib)

    def take(self, calib: list[dict[str, np.ndarray]], idx: torch.Tensor) -> list[dict[str, np.ndarray]]:
        return _inputs_at(calib, idx)

    def find_layers(self, calib: list[dict[str, np.ndarray]], config: EFRAPConfig) -> FoundLayers:
        """Every quantized weight onnxruntime wrote, on the grid it used (``weight_scheme``)."""
        layers, skipped, constants = find_quantized_layers(
            self.qdq, self.float_model, include_relu=config.unit == "activation"
        )
        if constants:
            log.info(
                "%d quantized constants that are no layer's weight (%s) keep onnxruntime's rounding: "
                "plan.meta.constants",
                len(constants),
                ", ".join(constants),
            )
        if not layers:  # only activations (or nothing) quantized: onnxruntime's own output, unchanged
            log.warning(
                "no quantized Conv / Gemm / MatMul weight EFRAP can learn in the model%s: nothing to defend, "
                "output as onnxruntime wrote it",
                f" ({len(skipped)} left as named)" if skipped else "",
            )
        inits = {t.name: t for t in self.qdq.graph.initializer}
        self.layers = layers
        self.grids = {
            layer.float_weight: weight_scheme(
                layer.float_weight,
                _integer_type(layer, inits),
                initializer_array(inits[layer.scale]).size > 1,
                self.options,
                f"layer {layer.node}",
            )
            for layer in layers
        }
        readers = [(layer.float_weight, layer.node) for layer in layers]
        return FoundLayers([layer.float_weight for layer in layers], skipped, constants, readers)

    def float_outputs(self, calib: list[dict[str, np.ndarray]]) -> torch.Tensor:
        name = self.float_model.graph.output[0].name
        return run_output(session(self.float_model), calib, name, "the float model")

    def problems(self, calib: list[dict[str, np.ndarray]], config: EFRAPConfig) -> Iterator[LayerProblem]:
        return _problems(self.float_model, self.qdq, self.layers, calib, self.grids)

    def held_out(self, held: list[dict[str, np.ndarray]]) -> HeldOut:
        return _held_out(self.float_model, self.qdq, held)

    def finish(self, learned: dict[str, LayerPlan]) -> ProducedPlan:
        """The plan with each layer's grid and where its integers and scale are stored in the graph."""
        layout = {
            layer.float_weight: {
                "quantized": layer.quantized,
                "scale": layer.scale,
                "transpose": layer.transpose,
                "node": layer.node,
            }
            for layer in self.layers
        }
        grids = {name: grid_record(g) for name, g in self.grids.items()}
        first = self.grids[self.layers[0].float_weight] if self.layers else QuantScheme.onnxruntime()
        return ProducedPlan(first, learned, grids, layout)


def defend_qdq(
    float_model: onnx.ModelProto,
    qdq: onnx.ModelProto,
    batches: list[dict[str, np.ndarray]],
    options: WeightOptions,
    config: EFRAPConfig,
    progress: bool = True,
) -> RoundingPlan:
    """Replace the weight integers of ``qdq`` (in place) by EFRAP's; return the plan. Each weight's grid
    is the one onnxruntime used (``weight_scheme``); ``plan.meta.grids`` holds each layer's range."""
    return run(QDQProducer(float_model, qdq, options), batches, config, progress=progress)


def pin_weight_grids(qdq: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """Give ``qdq``'s quantized weights the integers, scales and zero points ``target`` (onnxruntime's
    output of the same call in another format) stores under the same names. QOperator may store a weight
    on another grid than QDQ (per-channel QUInt8 becomes symmetric int8 for QLinearConv): learning on
    the pinned QDQ graph then learns on the grid the output really holds."""
    theirs = {t.name: t for t in target.graph.initializer}
    for tensor in qdq.graph.initializer:
        if tensor.name.endswith(("_quantized", "_scale", "_zero_point")) and tensor.name in theirs:
            pinned = theirs[tensor.name]
            if list(pinned.dims) == list(tensor.dims):
                tensor.CopyFrom(pinned)


def write_plan(model: onnx.ModelProto, plan: RoundingPlan) -> RoundingPlan:
    """Write ``plan``'s integers into another onnxruntime output of the same call (QOperator: QLinearConv,
    QGemm, MatMulInteger hold the same ``<weight>_quantized`` initializers, on the same scales). Layers the
    model left in float move to ``meta["skipped"]``; the returned plan is the one ``model`` holds."""
    inits = {t.name: t for t in model.graph.initializer}
    layout, skipped, layers = dict(plan.meta.layout or {}), dict(plan.meta.skipped), {}
    for name, lp in plan.layers.items():
        entry = layout[name]
        stored, scale = inits.get(entry["quantized"]), inits.get(entry["scale"])
        if stored is None:
            del layout[name]
            skipped[name] = "not quantized by onnxruntime in this format: left in float"
            continue
        if scale is None or not np.array_equal(
            np.atleast_1d(initializer_array(scale)).astype(np.float32),
            lp.scale.numpy().astype(np.float32).reshape(-1),
        ):
            raise EFRAPError(
                f"layer {entry['node']}: onnxruntime gave its weight another scale in this format than in QDQ; "
                "the plan's integers would not hold. Use QuantFormat.QDQ"
            )
        ints = lp.integers.transpose(0, 1) if entry["transpose"] else lp.integers
        _write_integers(stored, ints.numpy())
        layers[name] = lp
    return RoundingPlan(plan.scheme, layers, plan.source, plan.meta.replace(layout=layout, skipped=skipped))


def _integer_type(layer: QuantizedLayer, inits: dict[str, onnx.TensorProto]) -> int:
    """The integer type a layer's weight is rounded to: the stored initializer's, or, for a float weight
    QuantizeLinear rounds at run time, its zero point's (uint8 without one, as ONNX defines)."""
    if not layer.rounded_at_run_time:
        return inits[layer.quantized].data_type
    return zero_point_type(layer.zero_point, inits)


def write_float_grid(
    tensor: onnx.TensorProto, ints: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int
) -> None:
    """Overwrite a float weight with the grid points of ``ints`` (its own layout; channels on ``axis``),
    (q - zero point) x scale in the weight's own float type, which onnxruntime's nearest rounding (a
    QuantizeLinear at run time, or quantize_static's own) turns back into exactly ``ints``."""
    shape = [1] * ints.ndim
    if scale.size > 1:
        shape[axis] = -1
    s = scale.astype(np.float32).reshape(shape)
    z = zp.astype(np.float32).reshape(shape)
    dtype = initializer_array(tensor).dtype
    values = ((ints.astype(np.float32) - z) * s).astype(dtype)
    if not np.array_equal(np.rint(values.astype(np.float32) / s) + z, ints.astype(np.float32)):
        raise EFRAPError(
            f"weight {tensor.name!r}: its scale cannot hold the learned integers as {dtype} grid points"
        )
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


def _write_integers(tensor: onnx.TensorProto, ints: np.ndarray) -> None:
    """Overwrite a quantized weight initializer's integers, keeping its name and data type."""
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        new = onnx.helper.make_tensor(
            tensor.name, tensor.data_type, list(tensor.dims), ints.astype(np.int8).flatten().tolist()
        )
    else:
        new = numpy_helper.from_array(ints.astype(initializer_array(tensor).dtype), tensor.name)
    tensor.CopyFrom(new)
