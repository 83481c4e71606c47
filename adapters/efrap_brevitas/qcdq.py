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
from collections.abc import Callable
from dataclasses import dataclass
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
    ModelError,
    PlanMismatchError,
    QuantScheme,
    RoundingPlan,
    as_calibration,
    atomic_write,
    compare_integers,
    prepare_model,
)

from .defend import quant_layers

__all__ = [
    "QCDQWeight",
    "export_qcdq",
    "quantize_brevitas",
    "read_qcdq_integers",
    "read_qcdq_weights",
    "verify_qcdq",
]

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
    """A Brevitas int8 model (narrow-range weights, int8 inputs) built from a plain torch model; with
    ``plan``, on the plan's integers. For a model already built from ``brevitas.nn`` layers, use
    ``defend_quant_model``: it keeps the user's quantizers.

    ``model`` is not modified. BatchNorm is folded first, as Brevitas' preprocess_for_quantize does.
    """
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    if any(isinstance(m, QuantWeightBiasInputOutputLayer) for m in model.modules()):
        raise EFRAPError(
            "model: already a Brevitas model with its own quantizers; quantize_brevitas would replace them "
            "with int8 ones. Calibrate it as usual and call efrap_brevitas.defend_quant_model(model, calib)"
        )
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


@dataclass(frozen=True)
class QCDQWeight:
    """One quantized weight of a QCDQ file: the stored integers, scale, zero point and clamp range."""

    integers: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    bias: torch.Tensor | None = None
    """The layer's quantized bias as the file dequantizes it (float64), where it holds one."""
    bias_step: torch.Tensor | None = None
    """One step of that bias's grid, per element."""
    bias_range: tuple[int, int] | None = None
    """The integer range the bias is stored in (a bias quantizer clamps to it)."""


_WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "Gather": 0}
"""The ops that read a quantized weight, and the input they read it at (Gather: a QuantEmbedding's table)."""


def _scopes(node_name: str) -> list[str]:
    """The module scopes of a TorchScript-exported node: '/layer1/layer1.0/conv1/Conv' ->
    ['layer1', 'layer1.0', 'conv1']. Each is a name relative to some enclosing module, not a full name."""
    parts = []
    for part in node_name.strip("/").split("/")[:-1]:
        if part in ("weight_quant", "input_quant", "export_handler"):
            break
        parts.append(part)
    return parts


def _joined(scopes: list[str]) -> str:
    """A best guess at the full name, for modules no known name matches."""
    name = ""
    for part in scopes:
        name = part if not name or part.startswith(name + ".") else f"{name}.{part}"
    return name


def _fits(name: str, scopes: list[str]) -> bool:
    """Whether the full module name ``name`` can have ``scopes``: it ends with the last scope, and each
    scope starts at an atom of it, in order (scopes overlap: 'block', 'shortcut', 'shortcut.0')."""
    if not scopes or not (name == scopes[-1] or name.endswith("." + scopes[-1])):
        return False
    atoms, position = name.split("."), 0
    for part in scopes:
        try:
            position = atoms.index(part.split(".")[0], position)
        except ValueError:
            return False
    return True


def _resolve(found: list[tuple[list[str], QCDQWeight]], names: list[str]) -> dict[str, QCDQWeight]:
    """Name each weight after the module it came from. The exporter's scopes name a module relative to
    an enclosing one ('conv1' for 'block.conv1' in a GraphModule, 'shortcut.0' inside 'block'), so a
    weight takes the known name that fits its scopes; names several weights fit go to the known
    modules in execution order (``names``' order), as the trace met them."""
    taken: set[str] = set()
    out: dict[str, QCDQWeight] = {}
    for scopes, weight in found:
        guess = _joined(scopes)
        matches = [n for n in names if n not in taken and (n == guess or _fits(n, scopes))]
        name = ([n for n in matches if n == guess] or matches or [guess])[0]
        while name in out:  # unknown and repeated: keep every one, so it is reported
            name += "'"
        taken.add(name)
        out[name] = weight
    return out


def read_qcdq_weights(path: str | Path, names: list[str] | None = None) -> dict[str, QCDQWeight]:
    """Every weight a QCDQ file quantizes (integers -> [Clip] -> DequantizeLinear -> Conv / Gemm), keyed
    by the source module's name, read from the file's own constants. ``names``: the model's quantized
    layers in execution order (a plan's layers, say), to name weights whose scopes are ambiguous."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise ModelError(f"verify: cannot read {path} as an ONNX model ({exc})") from None
    except Exception as exc:  # protobuf's DecodeError
        raise ModelError(f"verify: {path} is not an ONNX model ({type(exc).__name__})") from None
    consts = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    producers = {out: n for n in model.graph.node for out in n.output}

    def const(name: str) -> np.ndarray | None:
        tensor = consts.get(name)
        if tensor is None:
            return None
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelError(f"verify: {path} keeps weights in external data; QCDQ exports keep them inside")
        return numpy_helper.to_array(tensor)

    found: list[tuple[list[str], QCDQWeight]] = []
    for node in model.graph.node:
        if node.op_type not in _WEIGHT_OPS or len(node.input) < 2:
            continue
        dq = producers.get(node.input[_WEIGHT_OPS[node.op_type]])
        if dq is not None and dq.op_type == "Transpose" and node.op_type == "MatMul":
            # a Linear on 3-D inputs (tokens): weight -> DequantizeLinear -> Transpose -> MatMul
            dq = producers.get(dq.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        clip = producers.get(dq.input[0])
        source = clip.input[0] if clip is not None and clip.op_type == "Clip" else dq.input[0]
        ints = const(source)
        if ints is None or ints.dtype.kind not in "iu":
            continue
        info = np.iinfo(ints.dtype)
        lo, hi = info.min, info.max
        if clip is not None and clip.op_type == "Clip":
            bounds = [const(n) if n else None for n in list(clip.input[1:3]) + [""] * (3 - len(clip.input))]
            lo = int(bounds[0]) if bounds[0] is not None else lo
            hi = int(bounds[1]) if bounds[1] is not None else hi
        zero_point = const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros(1, ints.dtype)
        weight = QCDQWeight(
            torch.from_numpy(ints.astype(np.int32)),
            torch.from_numpy(np.atleast_1d(const(dq.input[1])).astype(np.float32)),
            torch.from_numpy(np.atleast_1d(zero_point).astype(np.int32)),
            int(lo),
            int(hi),
            *_quantized_bias(node, producers, const),
        )
        found.append((_scopes(node.name), weight))
    return _resolve(found, names or [])


def _quantized_bias(
    node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], const: Callable[[str], np.ndarray | None]
) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[int, int] | None]:
    """A Conv / Gemm's integer bias as its DequantizeLinear reads it, its grid step and its stored
    range; Nones without one."""
    none = (None, None, None)
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 3 or not node.input[2]:
        return none
    dq = producers.get(node.input[2])
    if dq is None or dq.op_type != "DequantizeLinear":
        return none
    ints, scale = const(dq.input[0]), const(dq.input[1])
    if ints is None or scale is None or ints.dtype.kind not in "iu":
        return none
    zp = const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    zp = np.zeros(1) if zp is None else zp.astype(np.float64)
    values = (ints.astype(np.float64) - zp) * scale.astype(np.float64)
    step = np.broadcast_to(np.abs(scale.astype(np.float64)), values.shape).copy()
    info = np.iinfo(ints.dtype)
    return torch.from_numpy(values), torch.from_numpy(step), (int(info.min), int(info.max))


def read_qcdq_integers(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """int weights and scales of a QCDQ file, keyed by the source module name."""
    weights = read_qcdq_weights(path)
    return {k: w.integers for k, w in weights.items()}, {k: w.scale for k, w in weights.items()}


def verify_qcdq(
    path: str | Path, plan: RoundingPlan, model: nn.Module | None = None, strict: bool = True
) -> IntegerReport:
    """Compare the integers, scales and integer ranges stored in the QCDQ file with ``plan``, bit for bit.

    With ``model`` (the user's Brevitas model) each planned layer's stored integers and scale must also
    be what that layer's own quantizer gives now, and every integer-quantized layer of it must be in
    the plan (or skipped with a reason): a substituted quantizer, a changed bit width or a layer left
    out is a mismatch naming the layer.
    """
    layers = quant_layers(model)[0] if model is not None else {}
    names = list(plan.layers) + list(plan.meta.skipped)
    names += [n for n in layers if n not in names]
    weights = read_qcdq_weights(path, names)
    stored = {k: w.integers for k, w in weights.items()}
    scales = {k: w.scale for k, w in weights.items()}
    ranges = {k: (w.qmin, w.qmax) for k, w in weights.items()}
    zero_points = {k: w.zero_point for k, w in weights.items()}
    report = compare_integers(
        plan, stored, scales, strict=False, where=str(path), ranges=ranges, zero_points=zero_points
    )
    if model is not None:
        _check_against_model(report, layers, plan, weights)
        report.bias_mismatches.extend(_biases_off_their_grid(layers, weights))
    else:
        report.unchecked.extend(f"{name}.bias" for name, w in weights.items() if w.bias is not None)
    if strict and not report.integers_ok:
        raise PlanMismatchError(
            f"verify: {path} does not hold the plan's integers on the model's quantizers: {report.differences()}"
        )
    return report


def _biases_off_their_grid(layers: dict[str, nn.Module], weights: dict[str, QCDQWeight]) -> list[str]:
    """The layers whose quantized bias in the file is not their float bias rounded on its grid and
    clamped to its stored range (half a step, with float32's slack)."""
    off = []
    for name, stored in weights.items():
        layer = layers.get(name)
        if stored.bias is None or layer is None or getattr(layer, "bias", None) is None:
            continue
        step = stored.bias_step.reshape(-1)
        want = layer.bias.detach().to(torch.float64).reshape(-1)
        if stored.bias.numel() != want.numel():
            off.append(f"{name}.bias")
            continue
        lo, hi = stored.bias_range
        got_steps = stored.bias.reshape(-1) / step
        want_steps = (want / step).clamp(lo, hi)
        if bool(((got_steps - want_steps).abs() > 0.5 + 1e-6 * (want_steps.abs() + 1)).any()):
            off.append(f"{name}.bias")
    return off


def _check_against_model(
    report: IntegerReport, layers: dict[str, nn.Module], plan: RoundingPlan, weights: dict[str, QCDQWeight]
) -> None:
    """``layers``: the user's model's integer-quantized layers (quant_layers)."""
    listed = set(plan.meta.skipped)
    for name in sorted(set(layers) - set(plan.layers) - listed - set(report.unplanned)):
        report.unplanned.append(name)
    for name in plan.layers:
        layer, stored = layers.get(name), weights.get(name)
        if layer is None:
            report.mismatched[name] = -1
            continue
        with torch.no_grad():
            qt = layer.quant_weight()
        ints = qt.int().to(torch.int32)
        if stored is None or tuple(stored.integers.shape) != tuple(ints.shape):
            continue  # compare_integers counted it already
        diff = int((ints != stored.integers).sum())
        if diff:
            report.mismatched[name] = max(report.mismatched.get(name, 0), diff)
        if not torch.equal(qt.scale.detach().to(torch.float32).flatten(), stored.scale.flatten()):
            if name not in report.scale_mismatches:
                report.scale_mismatches.append(name)
    report.matching = sum(1 for name in plan.layers if name not in report.mismatched)
