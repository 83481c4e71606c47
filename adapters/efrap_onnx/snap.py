"""EFRAP as a pre-pass for the user's own, unchanged ``onnxruntime.quantization.quantize_static`` call.

``snap`` learns the plan as the drop-in does, then writes a float model whose weights sit on the grid
points of EFRAP's integers, and returns the ``TensorQuantOverrides`` that pin each weight's scale and zero
point to the ones onnxruntime chose. Stock onnxruntime, given that model and those extra options, rounds
every weight to nearest and so writes EFRAP's integers: the user's quantize_static stays theirs.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import QuantFormat

from efrap_plugin import EFRAPError, RoundingPlan, check_writable

from .defend import write_float_grid
from .drop_in import quantize_static
from .graph import WEIGHT_OPS
from .model_io import load_onnx, save_onnx

__all__ = ["snap"]

log = logging.getLogger(__name__)


def snap(
    model_input: str | Path | onnx.ModelProto,
    model_output: str | Path,
    calibration_data_reader: Any,
    **quantize_options: Any,
) -> tuple[RoundingPlan, dict[str, Any]]:
    """Learn EFRAP's rounding for the quantize_static call ``quantize_options`` describe (onnxruntime's
    arguments, and ``config`` / ``progress``), write ``model_output``: the float model with each learned
    weight on its grid points, and return the plan and the ``extra_options`` for the user's own call: theirs
    (the ``EFRAP`` key taken out), with ``TensorQuantOverrides`` pinning every learned weight on top of
    the overrides they pass, which are kept.

    Pass the same quantize_static options to your own call, on ``model_output``: onnxruntime then stores
    the plan's integers, and ``efrap_onnx.verify`` proves it on the file it wrote. A calibration reader
    is read once here; rewind it (or make another) for your call.
    """
    options = dict(quantize_options)
    if options.get("quant_format") == QuantFormat.QOperator:
        raise EFRAPError(
            "snap: a QOperator model stores weights that onnxruntime may re-grid for its integer kernels; "
            "snap for QuantFormat.QDQ, or use efrap_onnx.quantize_static for QOperator"
        )
    model_output = check_writable(model_output)  # before minutes of learning, not after
    float_model = model_input if isinstance(model_input, onnx.ModelProto) else load_onnx(model_input)
    _check_overrides(float_model, options.get("extra_options"))
    with tempfile.TemporaryDirectory(prefix="efrap-snap-") as tmp:
        plan = quantize_static(float_model, Path(tmp) / "learned.onnx", calibration_data_reader, **options)
    snapped = onnx.ModelProto.FromString(float_model.SerializeToString())
    inits = {t.name: t for t in snapped.graph.initializer}
    overrides = dict((options.get("extra_options") or {}).get("TensorQuantOverrides") or {})
    for name, lp in plan.layers.items():
        transpose = bool((plan.meta.layout or {})[name]["transpose"])
        overrides[name] = _pinned(name, lp, transpose, overrides.get(name))
        ints = (lp.integers.transpose(0, 1) if transpose else lp.integers).numpy()  # the weight's layout
        write_float_grid(inits[name], ints, lp.scale.numpy(), lp.zero_point.numpy(), 1 if transpose else 0)
    save_onnx(snapped, model_output)
    log.info("snap: %d weights on EFRAP's grid points, their scales pinned", len(plan.layers))
    theirs = {k: v for k, v in (options.get("extra_options") or {}).items() if k != "EFRAP"}
    return plan, {**theirs, "TensorQuantOverrides": overrides}


def _check_overrides(float_model: onnx.ModelProto, extra_options: dict[str, Any] | None) -> None:
    """Refuse, before any work, a user's override that pins a weight's scale: EFRAP learns on the scale
    onnxruntime computes, and pins it itself."""
    overrides = (extra_options or {}).get("TensorQuantOverrides") or {}
    weights = {n.input[1] for n in float_model.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1}
    for name, entries in overrides.items():
        if name in weights and any("scale" in e or "zero_point" in e for e in entries or []):
            raise EFRAPError(
                f"snap: TensorQuantOverrides already pins the scale of weight {name!r}; EFRAP learns on the "
                "scale onnxruntime computes and pins it itself. Remove that override"
            )


def _pinned(name: str, lp: Any, transpose: bool, theirs: list[dict] | None) -> list[dict[str, Any]]:
    """The override that pins a weight's scale and zero point (one entry per channel, with its axis),
    merged into the user's own override for that weight (its other keys kept)."""
    base = dict((theirs or [{}])[0])
    # onnxruntime casts a zero point to the weight's own integer type; a float32 scale stays float32
    scales, zero_points = lp.scale.numpy().astype(np.float32), lp.zero_point.numpy().tolist()
    if scales.size == 1:
        return [{**base, "scale": scales.reshape(()), "zero_point": int(zero_points[0])}]
    axis = 1 if transpose else 0
    entries = [
        {"scale": s.reshape(()), "zero_point": int(z)} for s, z in zip(scales, zero_points, strict=True)
    ]
    entries[0] = {**base, "axis": axis, **entries[0]}
    return entries
