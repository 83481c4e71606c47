"""A drop-in for ``onnxruntime.quantization.quantize_static`` that writes an EFRAP-defended QDQ model.

onnxruntime's own quantize_static runs first, with every argument the user gave, on the graph the user
gave (pre-processed only if they pre-processed it, as onnxruntime does); then, layer by layer in graph
order, EFRAP learns the rounding of each quantized weight against the real QDQ graph's inputs and the
float graph's outputs, and writes the integers into the weight initializers. Scales, zero points and
every other node are onnxruntime's own. ``quantize_images`` (the CLI's path) pre-processes first, as
onnxruntime's guide advises (BatchNorm folded into Conv).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    StaticQuantConfig,
)
from onnxruntime.quantization import quantize_static as ort_quantize_static

from efrap_plugin import DataError, EFRAPConfig, EFRAPError, ModelError, RoundingPlan, resolve_config

from .defend import QDQProducer, WeightOptions, defend_qdq, pin_weight_grids, write_plan
from .model_io import Prepared, check_onnx, input_names, load_onnx, prepare, save_onnx
from .runtime import session

__all__ = ["quantize", "quantize_static", "quantize_images", "ListDataReader"]

log = logging.getLogger(__name__)


class ListDataReader(CalibrationDataReader):
    """A CalibrationDataReader over a list of input dicts (or one array split in batches)."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.batches = list(batches)
        self._it = iter(self.batches)

    @classmethod
    def from_array(cls, name: str, x: np.ndarray, batch_size: int = 64) -> ListDataReader:
        """Batches of one input's rows: floating arrays as float32 (numpy's float64 included), integer
        ones (token ids) as they are."""
        x = np.asarray(x)
        return cls.from_arrays({name: x.astype(np.float32) if x.dtype.kind == "f" else x}, batch_size)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], batch_size: int = 64) -> ListDataReader:
        """One array per model input, row i of each together: batches of ``batch_size`` rows."""
        if not arrays:
            raise DataError(
                "calibration data: no arrays given; pass one array per model input, named as the input"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise DataError(f"batch_size: expected a positive number of rows, got {batch_size!r}")
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        if any(v.ndim == 0 for v in arrays.values()):
            raise DataError("calibration data: expected arrays with a row axis (N x ...), got a scalar")
        rows = min(len(v) for v in arrays.values())
        return cls(
            [{k: v[i : i + batch_size] for k, v in arrays.items()} for i in range(0, rows, batch_size)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve batches start_index..end_index only (onnxruntime's strided calibration asks for this)."""
        self._it = iter(self.batches[start_index:end_index])


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
        if not isinstance(item, Mapping):
            raise DataError(
                f"calibration_data_reader: get_next() returned a {type(item).__name__}; it must return a dict "
                "of input name -> array (or None at the end), as onnxruntime's CalibrationDataReader does"
            )
        batch = {k: np.asarray(v) for k, v in item.items()}
        if any(v.ndim == 0 or len(v) == 0 for v in batch.values()):
            raise DataError(
                "calibration_data_reader: a batch holds an array with no rows; each batch needs at least one input"
            )
        batches.append(batch)
    if not batches:
        raise DataError("calibration_data_reader: yielded no batches; it must return input dicts, then None")
    return _fitted(batches, model)


def _fitted(batches: list[dict[str, np.ndarray]], model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """``batches`` checked against the graph's inputs (names, shapes, dtypes, finite values) and
    re-batched to a fixed batch dimension where the graph has one."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    for inp in inputs:
        # a negative dimension (-1, as some exporters write a dynamic one) is dynamic too
        dims = [
            d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
            for d in inp.type.tensor_type.shape.dim
        ]
        if 0 in dims:
            raise ModelError(
                f"model: input {inp.name!r} declares a dimension of size 0 "
                f"({['N' if d is None else d for d in dims]}), which no input fits; re-export it with that "
                "dimension dynamic or of the size the model takes"
            )
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
            expected = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
            if arr.dtype != expected:
                raise DataError(
                    f"calibration data: input {inp.name!r} is {arr.dtype}, the graph expects {expected}; "
                    f"pass it as .astype(np.{expected})"
                )
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise DataError(f"calibration data: input {inp.name!r} holds NaN or Inf values")
    fixed = {
        d.dim_value
        for i in inputs
        for d in i.type.tensor_type.shape.dim[:1]
        if d.HasField("dim_value") and d.dim_value > 0
    }
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


def _runs_in_onnxruntime(quantized: onnx.ModelProto) -> None:
    """EFRAP learns on onnxruntime's QDQ graph and writes into its output: a graph onnxruntime cannot run
    (some float16 ones) leaves nothing to measure or defend, and is refused naming what onnxruntime said."""
    try:
        session(quantized, exact=True)
    except ModelError as exc:
        raise ModelError(
            f"model: onnxruntime's quantize_static writes a graph for it that onnxruntime cannot run "
            f"({str(exc).split('(', 1)[-1].rsplit(')', 1)[0]}); quantize the float32 model (export it in "
            "float32, or convert it back before quantizing)"
        ) from None


def _check_weight_type(weight_type: Any) -> None:
    if weight_type in (QuantType.QFLOAT8E4M3FN,):
        raise EFRAPError(
            "weight_type: float8 weights have no integer rounding to learn; pass QInt8, QUInt8, QInt4, "
            "QUInt4, QInt16 or QUInt16"
        )


def quantize_static(
    model_input: str | Path | onnx.ModelProto | Prepared,
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

    Returns the RoundingPlan (None with ``efrap=False``, the stock flow). ``extra_options["EFRAP"]``
    switches it from a config (``StaticQuantConfig(extra_options=...)``, a file): False for the stock
    flow, True or a dict of EFRAPConfig fields to defend. The output is written
    atomically: a failure leaves no partial file. ``model_input`` may also be ``prepare``'s result: read,
    checked and pre-processed already.
    """
    if quant_format not in (QuantFormat.QDQ, QuantFormat.QOperator):
        raise EFRAPError(
            f"quant_format: expected QuantFormat.QDQ or QuantFormat.QOperator, got {quant_format!r}"
        )
    _check_weight_type(weight_type)
    efrap, config, extra_options = _efrap_flag(extra_options, efrap, config)
    config = resolve_config(QDQProducer, config)  # a choice the drop-in cannot carry out: before any work
    float_model = _float_model(model_input)
    session(float_model)  # onnxruntime can run the user's model, or a clear error before any work
    batches = _collect(calibration_data_reader, float_model)
    common = (op_types_to_quantize, per_channel, reduce_range, activation_type, weight_type)
    common += (nodes_to_quantize, nodes_to_exclude, use_external_data_format, calibrate_method)
    common += (calibration_providers,)  # quantize_static's positional arguments, all but extra_options
    if not efrap:  # onnxruntime's stock flow, as it is
        output = _quantize_stock(float_model, batches, quant_format, *common, extra_options)
        save_onnx(output, model_output, external_data=use_external_data_format)
        return None
    _refuse_per_channel_below_opset_13(float_model, per_channel, weight_type)
    extra = extra_options or {}
    weights = WeightOptions(
        reduce_range, extra.get("WeightSymmetric"), extra.get("TensorQuantOverrides") or {}
    )
    output, plan = _defended(
        float_model, batches, quant_format, common, extra_options, weights, config, progress
    )
    save_onnx(output, model_output, external_data=use_external_data_format)
    return plan


EFRAP_KEY = "EFRAP"
"""The ``extra_options`` key that switches EFRAP from a config file: True / False, or EFRAPConfig fields."""


def _efrap_flag(
    extra_options: dict[str, Any] | None, efrap: bool, config: EFRAPConfig | None
) -> tuple[bool, EFRAPConfig | None, dict[str, Any] | None]:
    """``extra_options["EFRAP"]`` read and taken out (onnxruntime never sees it): False runs the stock flow,
    True the defaults, a dict of EFRAPConfig fields that config; given beside ``config=`` it is refused."""
    if not extra_options or EFRAP_KEY not in extra_options:
        return efrap, config, extra_options
    flag = extra_options[EFRAP_KEY]
    rest = {k: v for k, v in extra_options.items() if k != EFRAP_KEY}
    if config is not None and flag not in (True, False):
        raise EFRAPError('extra_options["EFRAP"] and config= both give EFRAP\'s settings; give one of them')
    if isinstance(flag, bool):
        return efrap and flag, config, rest
    if isinstance(flag, Mapping):
        return efrap, EFRAPConfig.from_dict(dict(flag)), rest
    raise EFRAPError(
        f'extra_options["EFRAP"]: expected True, False or a dict of EFRAPConfig fields, got {type(flag).__name__}'
    )


def _float_model(model_input: str | Path | onnx.ModelProto | Prepared) -> onnx.ModelProto:
    """The user's float model, read and checked; a ModelProto is copied (the caller's stays as it is)."""
    if isinstance(model_input, Prepared):  # read, checked and pre-processed already
        return model_input.model
    if isinstance(model_input, onnx.ModelProto):  # as onnxruntime takes it
        return check_onnx(onnx.ModelProto.FromString(model_input.SerializeToString()), "model_input")
    return load_onnx(model_input)


def _defended(
    float_model: onnx.ModelProto,
    batches: list[dict[str, np.ndarray]],
    quant_format: QuantFormat,
    common: tuple[Any, ...],
    extra_options: dict[str, Any] | None,
    weights: WeightOptions,
    config: EFRAPConfig,
    progress: bool,
) -> tuple[onnx.ModelProto, RoundingPlan]:
    """onnxruntime's output for the user's options with EFRAP's integers written in, and the plan.

    EFRAP learns on the QDQ graph (each layer's real quantized inputs). A QOperator output is
    onnxruntime's own QOperator graph: the QDQ graph's weights are first pinned to the grids it stores
    (same initializer names), and the learned integers are then written into it. (QOperator stores
    every weight as integers, AddQDQPairToWeight or not: so does its QDQ twin.)
    """
    qdq_extra = extra_options
    if quant_format == QuantFormat.QOperator and extra_options:
        qdq_extra = {k: v for k, v in extra_options.items() if k != "AddQDQPairToWeight"}
    qdq = _quantize_stock(float_model, batches, QuantFormat.QDQ, *common, qdq_extra)
    _runs_in_onnxruntime(qdq)
    if quant_format != QuantFormat.QOperator:
        return qdq, defend_qdq(float_model, qdq, batches, weights, config, progress)
    output = _quantize_stock(float_model, batches, QuantFormat.QOperator, *common, extra_options)
    _runs_in_onnxruntime(output)
    pin_weight_grids(qdq, output)
    return output, write_plan(output, defend_qdq(float_model, qdq, batches, weights, config, progress))


def _refuse_per_channel_below_opset_13(
    model: onnx.ModelProto, per_channel: bool, weight_type: QuantType
) -> None:
    """Per-channel 8-bit weights are a DequantizeLinear with an axis, which ONNX has from opset 13: below
    it onnxruntime writes a model that neither the checker nor onnxruntime loads (and EFRAP learns on
    that QDQ graph, whatever the output format)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if per_channel and weight_type in (QuantType.QInt8, QuantType.QUInt8) and opset < 13:
        raise ModelError(
            f"model: per_channel=True with 8-bit weights needs opset 13 or newer (a DequantizeLinear with an "
            f"axis) and the model has opset {opset}; convert it first "
            "(onnx.version_converter.convert_version(model, 13)) or pass per_channel=False"
        )


def _quantize_stock(
    float_model: onnx.ModelProto, batches: list[dict[str, np.ndarray]], *options: Any
) -> onnx.ModelProto:
    """onnxruntime's own quantize_static with the user's ``options`` (its positional arguments after the
    reader): the stock quantized graph. A model onnxruntime cannot quantize is a ModelError."""
    with tempfile.TemporaryDirectory(prefix="efrap-onnx-") as tmp:
        src, qdq = Path(tmp) / "in.onnx", Path(tmp) / "qdq.onnx"
        onnx.save(float_model, str(src))
        try:
            ort_quantize_static(str(src), str(qdq), ListDataReader(batches), *options)
        except EFRAPError:
            raise
        except Exception as exc:
            raise ModelError(
                f"model: onnxruntime's quantize_static cannot quantize it ({type(exc).__name__}: {exc})"
            ) from None
        return onnx.load(str(qdq))


def quantize(
    model_input: str | Path | onnx.ModelProto,
    model_output: str | Path,
    quant_config: StaticQuantConfig,
    *,
    efrap: bool = True,
    config: EFRAPConfig | None = None,
    progress: bool = True,
) -> RoundingPlan | None:
    """onnxruntime's ``quantize(model, out, StaticQuantConfig(...))``, with EFRAP rounding of the weights."""
    if not isinstance(quant_config, StaticQuantConfig):
        raise EFRAPError(
            f"quant_config: EFRAP defends static quantization (it needs calibration data); pass a "
            f"StaticQuantConfig, got {type(quant_config).__name__}"
        )
    c = quant_config
    return quantize_static(
        model_input,
        model_output,
        c.calibration_data_reader,
        c.quant_format,
        c.op_types_to_quantize,
        c.per_channel,
        c.reduce_range,
        c.activation_type,
        c.weight_type,
        c.nodes_to_quantize,
        c.nodes_to_exclude,
        c.use_external_data_format,
        c.calibrate_method,
        c.calibration_providers,
        c.extra_options,
        efrap=efrap,
        config=config,
        progress=progress,
    )


def quantize_images(
    model_input: str | Path | onnx.ModelProto | Prepared,
    model_output: str | Path,
    images: np.ndarray | Mapping[str, np.ndarray],
    bits: int = 8,
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
    efrap: bool = True,
    config: EFRAPConfig | None = None,
    progress: bool = True,
) -> RoundingPlan | None:
    """The common image-model case in one call: quant_pre_process (BatchNorm folded), then QDQ, MinMax,
    uint8 activations, QInt8 or QInt4 weights, calibration images fed to the graph's single input (or,
    for a model with several inputs, a dict of arrays named as its inputs). ``reduce_range`` quantizes
    weights to 7 bits, which onnxruntime's int8 kernels compute exactly on CPUs without VNNI.
    ``efrap=False`` is onnxruntime's stock flow. A loaded ``onnx.ModelProto`` is checked, not parsed again,
    and left as it was; a prepared one (``prepare``, which a caller that also scans the model's
    ``folded_weights`` does once for both) goes straight to quantization."""
    weight_types = {8: QuantType.QInt8, 4: QuantType.QInt4}
    if bits not in weight_types:
        raise EFRAPError(f"bits: onnxruntime quantizes weights to 8 (QInt8) or 4 (QInt4) bits, got {bits}")
    where = "model_input" if isinstance(model_input, (onnx.ModelProto, Prepared)) else model_input
    prepared = model_input if isinstance(model_input, Prepared) else prepare(model_input, where)
    names = input_names(prepared.model)
    if isinstance(images, Mapping):
        if sorted(images) != sorted(names):
            raise DataError(
                f"calibration data: the model takes inputs {names}, got arrays {sorted(images)}; "
                "name one array per input"
            )
        reader = ListDataReader.from_arrays(images)
    elif len(names) != 1:
        raise EFRAPError(
            f"model: {where} has inputs {names}; pass one calibration array per input, "
            "as a dict named by input"
        )
    else:
        reader = ListDataReader.from_array(names[0], images)
    return quantize_static(
        prepared,
        model_output,
        reader,
        per_channel=per_channel,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=weight_types[bits],
        efrap=efrap,
        config=config,
        progress=progress,
    )
