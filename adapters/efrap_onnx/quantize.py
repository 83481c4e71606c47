"""A drop-in for ``onnxruntime.quantization.quantize_static`` that writes an EFRAP-defended QDQ model.

Stock quantize_static runs first (BatchNorm folded by quant_pre_process, activations calibrated);
then, layer by layer in graph order, EFRAP learns the rounding of each quantized weight against the
real QDQ graph's inputs and the float graph's outputs, and writes the integers into the weight
initializers. Scales and zero points are onnxruntime's own, so nothing re-rounds.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
from onnxruntime.quantization import quantize_static as ort_quantize_static

from efrap_plugin import (
    DataError,
    EFRAPConfig,
    EFRAPError,
    LayerProblem,
    ModelError,
    QuantScheme,
    RoundingPlan,
    defend_layers,
)

from .graph import QuantizedLayer, find_quantized_layers
from .model_io import initializer_array, load_onnx, preprocess, save_onnx

__all__ = ["quantize_static", "quantize_images", "ListDataReader", "session"]

log = logging.getLogger(__name__)

_MAX_QUOTED = 600  # characters of a backend's error message quoted in ours


class ListDataReader(CalibrationDataReader):
    """A CalibrationDataReader over a list of input dicts (or one array split in batches)."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.batches = list(batches)
        self._it = iter(self.batches)

    @classmethod
    def from_array(cls, name: str, x: np.ndarray, batch_size: int = 64) -> ListDataReader:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return cls([{name: x[i : i + batch_size]} for i in range(0, len(x), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.batches)


def session(model: onnx.ModelProto | str | Path, outputs: list[str] | None = None) -> ort.InferenceSession:
    """A CPU InferenceSession, optionally exposing intermediate tensors as extra outputs.

    A model onnxruntime cannot load (an opset it does not know, an op it lacks) is a ModelError.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if isinstance(model, onnx.ModelProto):
        if outputs:
            model = onnx.ModelProto.FromString(model.SerializeToString())
            have = {o.name for o in model.graph.output}
            for name in outputs:
                if name not in have:
                    model.graph.output.append(
                        onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                    )
        source: Any = model.SerializeToString()
    else:
        source = str(model)
    try:
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's pybind errors share no public base class
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if len(first) > _MAX_QUOTED:
            first = first[:_MAX_QUOTED] + " ..."
        raise ModelError(
            f"model: onnxruntime {ort.__version__} cannot run it ({first}); export it with an opset and ops "
            "this onnxruntime supports"
        ) from None


def _collect(reader: Any, model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    if reader is None:
        raise DataError(
            "calibration_data_reader: required; pass a CalibrationDataReader yielding input dicts"
        )
    batches = []
    while True:
        item = reader.get_next() if hasattr(reader, "get_next") else None
        if item is None:
            break
        batches.append({k: np.asarray(v) for k, v in item.items()})
    if not batches:
        raise DataError("calibration_data_reader: yielded no batches; it must return input dicts, then None")
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    for inp in inputs:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        for batch in batches:
            if inp.name not in batch:
                raise DataError(
                    f"calibration data: batch lacks the model input {inp.name!r}; got {sorted(batch)}"
                )
            arr = batch[inp.name]
            if arr.ndim != len(dims) or any(
                d is not None and d != a for d, a in zip(dims[1:], arr.shape[1:])
            ):
                raise DataError(
                    f"calibration data: input {inp.name!r} has shape {arr.shape}, the graph expects "
                    f"{['N' if d is None else d for d in dims]}; pass N x {' x '.join(str(d) for d in dims[1:])} float32"
                )
            if not np.isfinite(arr).all():
                raise DataError(f"calibration data: input {inp.name!r} holds NaN or Inf values")
    fixed = {d.dim_value for i in inputs for d in i.type.tensor_type.shape.dim[:1] if d.HasField("dim_value")}
    return _rebatch(batches, fixed.pop()) if len(fixed) == 1 else batches


def _rebatch(batches: list[dict[str, np.ndarray]], size: int) -> list[dict[str, np.ndarray]]:
    """Batches of exactly ``size`` rows, for a graph exported with a fixed batch dimension."""
    joined = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    rows = min(len(v) for v in joined.values())
    if rows < size:
        raise DataError(f"calibration data: the model takes batches of {size}; pass at least {size} inputs")
    if any(len(b[k]) != size for b in batches for k in b):
        log.info("the model's batch dimension is fixed at %d: calibration data re-batched", size)
    return [{k: v[i : i + size] for k, v in joined.items()} for i in range(0, rows - size + 1, size)]


def _weight_bits(weight_type: Any) -> int:
    if weight_type == QuantType.QInt8:
        return 8
    if weight_type == QuantType.QInt4:
        return 4
    raise EFRAPError(
        f"weight_type: EFRAP defends signed symmetric weights, QuantType.QInt8 or QuantType.QInt4; got QuantType.{weight_type}"
    )


def quantize_static(
    model_input: str | Path,
    model_output: str | Path,
    calibration_data_reader: CalibrationDataReader | None = None,
    quant_format: QuantFormat = QuantFormat.QDQ,
    op_types_to_quantize: list[str] | None = None,
    per_channel: bool = False,
    reduce_range: bool = False,
    activation_type: QuantType = QuantType.QInt8,
    weight_type: QuantType = QuantType.QInt8,
    nodes_to_quantize: list[str] | None = None,
    nodes_to_exclude: list[str] | None = None,
    use_external_data_format: bool = False,
    calibrate_method: CalibrationMethod = CalibrationMethod.MinMax,
    calibration_providers: list[str] | None = None,
    extra_options: dict[str, Any] | None = None,
    *,
    efrap: bool = True,
    config: EFRAPConfig | None = None,
    progress: bool = True,
) -> RoundingPlan | None:
    """onnxruntime's quantize_static, same arguments, with EFRAP rounding of the quantized weights.

    Returns the RoundingPlan (None with ``efrap=False``, the stock flow). The output is written
    atomically: a failure leaves no partial file.
    """
    if quant_format != QuantFormat.QDQ:
        raise EFRAPError(
            "quant_format: EFRAP writes QDQ models; pass QuantFormat.QDQ (QOperator is not supported)"
        )
    if reduce_range:
        raise EFRAPError("reduce_range: not supported; the 7-bit reduced range is for old CPUs without VNNI")
    bits = _weight_bits(weight_type)
    config = config or EFRAPConfig()
    float_model = load_onnx(model_input)
    session(float_model)  # onnxruntime can run the user's model, or a clear error before any work
    batches = _collect(calibration_data_reader, float_model)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="efrap-onnx-") as tmp:
        src, pre, qdq_path = Path(tmp) / "in.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "qdq.onnx"
        onnx.save(float_model, str(src))
        preprocess(src, pre)
        _quantize_stock(
            str(pre),
            str(qdq_path),
            ListDataReader(batches),
            quant_format,
            op_types_to_quantize,
            per_channel,
            reduce_range,
            activation_type,
            weight_type,
            nodes_to_quantize,
            nodes_to_exclude,
            use_external_data_format,
            calibrate_method,
            calibration_providers,
            extra_options,
        )
        pre_model = onnx.load(str(pre))
        qdq = onnx.load(str(qdq_path))
    plan = None
    if efrap:
        scheme = QuantScheme.onnxruntime(bits, per_channel)
        plan = defend_qdq(pre_model, qdq, batches, scheme, config, progress)
        log.info("EFRAP: %d layers in %.1f s", len(plan.layers), time.perf_counter() - start)
    save_onnx(qdq, model_output)
    return plan


def _quantize_stock(src: str, out: str, *args: Any) -> None:
    """onnxruntime's own quantize_static; its failures on a model it cannot handle become ModelErrors."""
    try:
        ort_quantize_static(src, out, *args)
    except EFRAPError:
        raise
    except Exception as exc:
        raise ModelError(
            f"model: onnxruntime's quantize_static cannot quantize it ({type(exc).__name__}: {exc})"
        ) from None


def quantize_images(
    model_input: str | Path,
    model_output: str | Path,
    images: np.ndarray,
    bits: int = 8,
    *,
    per_channel: bool = True,
    efrap: bool = True,
    config: EFRAPConfig | None = None,
    progress: bool = True,
) -> RoundingPlan | None:
    """The common image-model case in one call: QDQ, MinMax, uint8 activations, QInt8 or QInt4 weights,
    calibration images fed to the graph's single input. ``efrap=False`` is onnxruntime's stock flow."""
    weight_types = {8: QuantType.QInt8, 4: QuantType.QInt4}
    if bits not in weight_types:
        raise EFRAPError(f"bits: onnxruntime quantizes weights to 8 (QInt8) or 4 (QInt4) bits, got {bits}")
    model = load_onnx(model_input, check_finite=False)
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) != 1:
        raise EFRAPError(
            f"model: {model_input} has inputs {names}; quantize_images handles single-input models"
        )
    return quantize_static(
        model_input,
        model_output,
        ListDataReader.from_array(names[0], images),
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=weight_types[bits],
        efrap=efrap,
        config=config,
        progress=progress,
    )


def _run(sess: ort.InferenceSession, batches: list[dict[str, np.ndarray]], name: str) -> torch.Tensor:
    feeds = {i.name for i in sess.get_inputs()}
    return torch.cat(
        [torch.from_numpy(sess.run([name], {k: v for k, v in b.items() if k in feeds})[0]) for b in batches]
    )


def _to_core(arr: np.ndarray, layer: QuantizedLayer) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.T.contiguous() if layer.transpose else t


def _calibration_subset(batches: list[dict[str, np.ndarray]], size: int) -> list[dict[str, np.ndarray]]:
    """The leading batches holding ``size`` inputs (the last one cut)."""
    calib, n = [], 0
    for b in batches:
        take = {k: v[: size - n] for k, v in b.items()}
        calib.append(take)
        n += len(next(iter(take.values())))
        if n >= size:
            break
    return calib


def _problems(
    float_model: onnx.ModelProto,
    qdq: onnx.ModelProto,
    layers: list[QuantizedLayer],
    calib: list[dict[str, np.ndarray]],
    scheme: QuantScheme,
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
        if np.any(zp != 0):
            raise EFRAPError(
                f"layer {layer.node}: weights are quantized with non-zero zero points; EFRAP needs symmetric "
                "weights (extra_options WeightSymmetric=True, onnxruntime's default)"
            )

        def install(integers: torch.Tensor, layer=layer) -> None:
            ints = integers.T if layer.transpose else integers
            _write_integers(inits[layer.quantized], ints.numpy())

        yield LayerProblem(
            layer.float_weight,
            weight,
            scheme,
            layer.forward,
            _run(session(qdq, [layer.input_name]), calib, layer.input_name),
            _run(session(float_model, [layer.output_name]), calib, layer.output_name),
            scale,
            torch.from_numpy(zp),
            install=install,
        )


def defend_qdq(
    float_model: onnx.ModelProto,
    qdq: onnx.ModelProto,
    batches: list[dict[str, np.ndarray]],
    scheme: QuantScheme,
    config: EFRAPConfig,
    progress: bool = True,
) -> RoundingPlan:
    """Replace the weight integers of ``qdq`` (in place) by EFRAP's; return the plan."""
    layers, skipped = find_quantized_layers(qdq, float_model, include_relu=config.unit == "activation")
    if skipped:
        log.warning("left in float or at nearest rounding (unsupported form): %s", ", ".join(skipped))
    if not layers:
        raise ModelError(
            "model: no quantized Conv / Gemm / MatMul weight found in the QDQ graph; nothing to defend"
        )
    calib = _calibration_subset(batches, config.calib_size)
    plans = defend_layers(_problems(float_model, qdq, layers, calib, scheme), config, len(layers), progress)
    layout = {
        layer.float_weight: {
            "quantized": layer.quantized,
            "scale": layer.scale,
            "transpose": layer.transpose,
            "node": layer.node,
        }
        for layer in layers
    }
    meta = {"config": config.to_dict(), "layout": layout, "skipped": skipped}
    return RoundingPlan(scheme, plans, "onnx", meta)


def _write_integers(tensor: onnx.TensorProto, ints: np.ndarray) -> None:
    """Overwrite a quantized weight initializer's integers, keeping its name and data type."""
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        new = onnx.helper.make_tensor(
            tensor.name, tensor.data_type, list(tensor.dims), ints.astype(np.int8).flatten().tolist()
        )
    else:
        new = numpy_helper.from_array(ints.astype(initializer_array(tensor).dtype), tensor.name)
    tensor.CopyFrom(new)
