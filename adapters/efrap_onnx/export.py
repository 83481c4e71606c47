"""From a torch model to ONNX: the float export, and a defended QDQ int8 model from a RoundingPlan."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch

from efrap_plugin import (
    EFRAPError,
    PlanMismatchError,
    RoundingPlan,
    as_calibration,
    atomic_write,
    check_writable,
    core_weight,
    fingerprint,
)

from .drop_in import quantize_images
from .graph import WEIGHT_OPS, channels_on_axis_1, find_quantized_layers
from .model_io import initializer_array, save_onnx
from .verify import VerifyReport, verify

__all__ = ["export_float_onnx", "export_defended", "onnx_plan"]

log = logging.getLogger(__name__)


def export_float_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """torch.onnx.export (dynamo) with a dynamic batch dimension; input 'input', output 'logits'."""
    model = model.eval()
    with tempfile.TemporaryDirectory(prefix="efrap-export-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example[:2],),
            dynamo=True,
            verbose=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        )
        tmp_path = Path(tmp) / "model.onnx"
        program.save(str(tmp_path))
        data = onnx.load(str(tmp_path))
    return save_onnx(data, path)


def onnx_plan(
    plan: RoundingPlan,
    float_onnx: onnx.ModelProto,
    qdq: onnx.ModelProto,
    snapped_prints: Mapping[str, str] | None = None,
) -> RoundingPlan:
    """The torch plan re-keyed by the ONNX initializers that hold the same (snapped) weights.

    ``snapped_prints`` (layer -> fingerprint of the snapped float weight the export saw) finds each
    layer's initializer; without it the fingerprint of the plan's dequantized integers is used.
    """
    # the layout each weight's reader gives it: output channels on axis 1 (a MatMul's K x N, a
    # ConvTranspose's C_in x C_out / group x k) are first in the plan, so the print is of the swapped array
    swapped = {
        node.input[1]: channels_on_axis_1(node)
        for node in float_onnx.graph.node
        if node.op_type in WEIGHT_OPS and len(node.input) > 1
    }
    by_print: dict[str, tuple[str, bool]] = {}
    for t in float_onnx.graph.initializer:
        arr = np.array(initializer_array(t))
        if arr.dtype != np.float32 or arr.ndim < 2:
            continue
        swap = swapped.get(t.name, False)
        core = np.ascontiguousarray(np.swapaxes(arr, 0, 1)) if swap else arr
        by_print[fingerprint(torch.from_numpy(core))] = (t.name, swap)
    inits = {t.name for t in qdq.graph.initializer}
    layers, layout = {}, {}
    for name, lp in plan.layers.items():
        snapped = plan.scheme.dequantize(lp.integers, lp.scale, lp.zero_point)
        key = (snapped_prints or {}).get(name) or fingerprint(snapped)
        if key not in by_print:
            raise PlanMismatchError(
                f"export: no ONNX initializer holds the snapped weights of layer {name!r}"
            )
        onnx_name, transpose = by_print[key]
        if f"{onnx_name}_quantized" not in inits:
            raise PlanMismatchError(f"export: onnxruntime did not quantize {onnx_name!r} (layer {name!r})")
        layers[onnx_name] = dataclasses.replace(lp, name=onnx_name)
        layout[onnx_name] = {
            "quantized": f"{onnx_name}_quantized",
            "scale": f"{onnx_name}_scale",
            "transpose": transpose,
            "node": name,
        }
    # quantized tensors that are no layer's weight (an embedding table, say) keep onnxruntime's rounding
    constants = find_quantized_layers(qdq, float_onnx)[2]
    return RoundingPlan(plan.scheme, layers, "onnx", plan.meta.replace(layout=layout, constants=constants))


def export_defended(
    model: torch.nn.Module,
    plan: RoundingPlan,
    calib_data,
    path: str | Path,
    per_channel: bool = True,
) -> tuple[RoundingPlan, VerifyReport]:
    """Write a QDQ int8 (or int4) ONNX model whose weight integers are ``plan``'s, and prove it.

    The model is snapped to the plan's grid, exported, quantized by onnxruntime's stock
    quantize_static (its own observer and rounding), then the integers are read back and compared.
    """
    if plan.scheme.name != "onnxruntime":
        raise EFRAPError(
            f"plan: made for the {plan.scheme.name!r} scheme; onnxruntime needs a plan made with "
            "scheme='onnxruntime' (its scale rule and integer range differ)"
        )
    calib = as_calibration(calib_data)
    path = check_writable(path)
    snapped = plan.snap(model)
    with tempfile.TemporaryDirectory(prefix="efrap-export-") as tmp:
        float_path = export_float_onnx(snapped, calib[:2], Path(tmp) / "snapped.onnx")
        written = Path(tmp) / "defended.onnx"  # proven before it is put at ``path``
        quantize_images(
            float_path,
            written,
            calib.numpy(),
            plan.scheme.bits,
            per_channel=per_channel,
            efrap=False,
            progress=False,
        )
        modules = dict(snapped.named_modules())
        prints = {name: fingerprint(core_weight(modules[name])) for name in plan.layers}
        keyed = onnx_plan(plan, onnx.load(str(float_path)), onnx.load(str(written)), prints)
        report = verify(written, keyed, strict=False)
        if not report.integers_ok:
            skipped = plan.meta.skipped
            why = (
                f"; the plan left {sorted(skipped)} unlearned ({next(iter(skipped.values()))})"
                if skipped
                else ""
            )
            raise PlanMismatchError(
                f"export: the QDQ model onnxruntime wrote does not hold the plan's integers, so nothing was "
                f"written to {path}: {report.differences()}{why}"
            )
        atomic_write(path, written.read_bytes())
    return keyed, report
