"""Proof from the artifact itself: the integers written in the file, and the kernels onnxruntime runs."""

from __future__ import annotations

import collections
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from efrap_plugin import PlanMismatchError, RoundingPlan

from .model_io import initializer_array, load_onnx

__all__ = ["VerifyReport", "verify", "optimized_op_counts"]

INT_KERNELS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat")


@dataclass
class VerifyReport:
    """What was read back from the written QDQ file."""

    layers: int
    matching: int
    mismatched: dict[str, int] = field(default_factory=dict)
    scale_mismatches: list[str] = field(default_factory=list)
    int_kernels: dict[str, int] = field(default_factory=dict)

    @property
    def integers_ok(self) -> bool:
        return self.matching == self.layers and not self.mismatched and not self.scale_mismatches

    @property
    def runs_int_kernels(self) -> bool:
        """Whether onnxruntime's optimized graph runs integer kernels for every planned layer."""
        return sum(self.int_kernels.values()) >= self.layers

    @property
    def ok(self) -> bool:
        return self.integers_ok

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(integers_ok=self.integers_ok, runs_int_kernels=self.runs_int_kernels)
        return out


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
    report = VerifyReport(layers=len(plan.layers), matching=0)
    for name, lp in plan.layers.items():
        where = plan.meta["layout"][name]
        if where["quantized"] not in inits:
            report.mismatched[name] = -1
            continue
        stored = initializer_array(inits[where["quantized"]]).astype(np.int32)
        if where["transpose"]:
            stored = stored.T
        planned = lp.integers.numpy().astype(np.int32)
        if stored.shape != planned.shape:
            report.mismatched[name] = -1
            continue
        diff = int((stored != planned).sum())
        scale = np.atleast_1d(initializer_array(inits[where["scale"]])).astype(np.float32)
        if not np.array_equal(scale, lp.scale.numpy().astype(np.float32)):
            report.scale_mismatches.append(name)
        if diff:
            report.mismatched[name] = diff
        else:
            report.matching += 1
    counts = optimized_op_counts(model_path)
    report.int_kernels = {k: v for k, v in counts.items() if k in INT_KERNELS}
    if strict and not report.integers_ok:
        raise PlanMismatchError(
            f"verify: {model_path} does not hold the plan's integers: differing elements per layer "
            f"{report.mismatched}, scale mismatches {report.scale_mismatches}"
        )
    return report
