"""Proof from the artifact itself: the integers written in the file, and the kernels onnxruntime runs."""

from __future__ import annotations

import collections
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from efrap_plugin import IntegerReport, PlanMismatchError, RoundingPlan, compare_integers

from .model_io import initializer_array, load_onnx

__all__ = ["VerifyReport", "verify", "optimized_op_counts"]

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
    """What was read back from the written QDQ file, and the kernels onnxruntime runs for it."""

    int_kernels: dict[str, int] = field(default_factory=dict)

    @property
    def runs_int_kernels(self) -> bool:
        """Whether onnxruntime's optimized graph runs integer kernels for every planned layer."""
        return sum(self.int_kernels.values()) >= self.layers

    def to_dict(self) -> dict:
        return {**super().to_dict(), "runs_int_kernels": self.runs_int_kernels}


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


def verify(model_path: str | Path, plan: RoundingPlan, strict: bool = True) -> VerifyReport:
    """Compare the weight integers stored in ``model_path`` with ``plan``, bit for bit.

    With ``strict`` a mismatch raises PlanMismatchError naming the layers.
    """
    if plan.source != "onnx" or "layout" not in plan.meta:
        raise PlanMismatchError(
            "verify: the plan has no ONNX layout; pass the plan returned by efrap_onnx.quantize_static or "
            "export_defended"
        )
    model = load_onnx(model_path, check_finite=False)
    inits = {t.name: t for t in model.graph.initializer}
    stored, scales = {}, {}
    for name in plan.layers:
        where = plan.meta["layout"][name]
        if where["quantized"] not in inits or where["scale"] not in inits:
            continue
        ints = torch.from_numpy(initializer_array(inits[where["quantized"]]).astype(np.int32))
        stored[name] = ints.T if where["transpose"] else ints
        scales[name] = torch.from_numpy(
            np.atleast_1d(initializer_array(inits[where["scale"]])).astype(np.float32)
        )
    check = compare_integers(plan, stored, scales, strict=strict, where=str(model_path))
    return VerifyReport(
        **{f: getattr(check, f) for f in ("layers", "matching", "mismatched", "scale_mismatches")},
        int_kernels={k: v for k, v in optimized_op_counts(model_path).items() if k in INT_KERNELS},
    )
