"""Brevitas with EFRAP's integers, exported to ONNX QCDQ and run in onnxruntime.

The defended flow snaps the weights to the plan's grid and quantizes with Brevitas' stock
Int8Weight*Float quantizers: their abs-max scale comes out unchanged and their rounding gives the
plan's integers, which are then read back from the int8 initializers of the QCDQ file.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from efrap_plugin import (
    EFRAPError,
    IntegerReport,
    QuantScheme,
    RoundingPlan,
    as_calibration,
    atomic_write,
    compare_integers,
    prepare_model,
)

__all__ = ["quantize_brevitas", "export_qcdq", "read_qcdq_integers", "verify_qcdq"]

log = logging.getLogger(__name__)


def _quant_layer(layer: nn.Module, per_channel: bool) -> nn.Module:
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Int8WeightPerTensorFloat

    quant = {
        "weight_quant": Int8WeightPerChannelFloat if per_channel else Int8WeightPerTensorFloat,
        "input_quant": Int8ActPerTensorFloat,
    }
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        new = qnn.QuantLinear(layer.in_features, layer.out_features, bias=bias, **quant)
    else:
        cls = qnn.QuantConv1d if isinstance(layer, nn.Conv1d) else qnn.QuantConv2d
        new = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=bias,
            **quant,
        )
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        if bias:
            new.bias.copy_(layer.bias)
    return new


def _swap(module: nn.Module, per_channel: bool) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            setattr(module, name, _quant_layer(child, per_channel))
        else:
            _swap(child, per_channel)


def quantize_brevitas(
    model: nn.Module, calib_data: Any, plan: RoundingPlan | None = None, per_channel: bool = True
) -> nn.Module:
    """A Brevitas int8 model (narrow-range weights, int8 inputs); with ``plan``, on the plan's integers.

    ``model`` is not modified. BatchNorm is folded first, as Brevitas' preprocess_for_quantize does.
    """
    from brevitas.graph.calibrate import calibration_mode

    if plan is not None and plan.scheme.name != "brevitas-int8":
        raise EFRAPError(
            f"plan: made for the {plan.scheme.name!r} scheme; Brevitas' Int8Weight quantizers need "
            "scheme='brevitas-int8' (narrow range [-127, 127], scale max|w|/127)"
        )
    if plan is not None:
        per_channel = plan.scheme.per_channel
        source = plan.snap(model)
    else:
        source = prepare_model(model, QuantScheme.brevitas(8, per_channel))
    calib = as_calibration(calib_data)
    quantized = copy.deepcopy(source).eval()
    _swap(quantized, per_channel)
    with torch.no_grad(), calibration_mode(quantized):
        for i in range(0, calib.shape[0], 64):
            quantized(calib[i : i + 64])
    return quantized.eval()


def export_qcdq(quantized: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """ONNX QCDQ export (TorchScript exporter: the dynamo one can silently drop custom rounding)."""
    from brevitas.export import export_onnx_qcdq

    with tempfile.TemporaryDirectory(prefix="efrap-brevitas-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmp_path = Path(tmp) / "model.onnx"
        export_onnx_qcdq(
            quantized,
            args=example[:1],
            export_path=str(tmp_path),
            dynamo=False,
            keep_initializers_as_inputs=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
        data = tmp_path.read_bytes()
    return atomic_write(Path(path), data)


def read_qcdq_integers(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """int8 weights and scales of a QCDQ file, keyed by the source module name."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    ints, scales = {}, {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        dq = producers.get(node.input[1])
        clip = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        source = clip.input[0] if clip is not None and clip.op_type == "Clip" else dq.input[0] if dq else None
        if source not in inits:
            continue
        name = node.name.strip("/").split("/")[0]
        ints[name] = torch.from_numpy(numpy_helper.to_array(inits[source]).astype(np.int32))
        scales[name] = torch.from_numpy(
            np.atleast_1d(numpy_helper.to_array(inits[dq.input[1]])).astype(np.float32)
        )
    return ints, scales


def verify_qcdq(path: str | Path, plan: RoundingPlan, strict: bool = True) -> IntegerReport:
    """Compare the int8 weights stored in the QCDQ file with ``plan``, bit for bit."""
    ints, scales = read_qcdq_integers(path)
    return compare_integers(plan, ints, scales, strict=strict, where=str(path))
