"""The one conformance check every adapter runs: same plan in, same integers out, bit for bit."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

from .errors import PlanMismatchError
from .plan import RoundingPlan

__all__ = ["IntegerReport", "compare_integers"]


@dataclass
class IntegerReport:
    """How the integers read back from a backend artifact compare with a plan.

    ``unplanned`` lists quantized layers the artifact holds and the plan does not: a verification that
    cannot account for every quantized layer fails, as does one with no layer at all. ``skipped``: layers
    the plan lists as left at nearest rounding, with a reason (``plan.meta.skipped``): accounted for.
    ``constants``: quantized tensors that are no layer's weight (an Add's bias, a norm's scale, a lookup
    table), which the plan lists with their readers (``plan.meta.constants``): accounted for.
    """

    layers: int
    matching: int
    mismatched: dict[str, int] = field(default_factory=dict)
    scale_mismatches: list[str] = field(default_factory=list)
    zero_point_mismatches: list[str] = field(default_factory=list)
    """Layers whose artifact dequantizes with other zero points than the plan's."""
    bias_mismatches: list[str] = field(default_factory=list)
    """Quantized biases that are not the float model's bias rounded on their own grid."""
    unchecked: list[str] = field(default_factory=list)
    """Quantized tensors the artifact holds that this verification could not compare (a quantized bias
    when no float model was given): named, so a reader knows what the verdict does not cover."""
    unplanned: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    constants: list[str] = field(default_factory=list)
    grid_mismatches: dict[str, str] = field(default_factory=dict)
    """Layers whose artifact stores another integer range than the plan's grid (a changed bit width
    or a substituted quantizer), with what each holds."""

    @property
    def integers_ok(self) -> bool:
        return (
            self.layers > 0
            and self.matching == self.layers
            and not self.mismatched
            and not self.scale_mismatches
            and not self.zero_point_mismatches
            and not self.bias_mismatches
            and not self.unplanned
            and not self.grid_mismatches
        )

    def differences(self) -> str:
        """Every way the artifact departs from the plan, for an error message."""
        return (
            f"differing elements per layer {self.mismatched} (-1: layer missing), scale mismatches "
            f"{self.scale_mismatches}, zero point mismatches {self.zero_point_mismatches}, bias mismatches "
            f"{self.bias_mismatches}, quantized layers the plan lacks {self.unplanned}, other grids "
            f"{self.grid_mismatches}"
        )

    def check(self, plan: RoundingPlan, where: str, stored: int) -> None:
        """Raise PlanMismatchError naming every difference, unless the artifact holds the plan."""
        if self.integers_ok:
            return
        if not plan.layers:
            raise PlanMismatchError(
                f"verify: the plan holds no layer, so it proves nothing about {where} "
                f"({stored} quantized layers there); pass the plan the defense returned"
            )
        raise PlanMismatchError(f"verify: {where} does not hold the plan's integers: {self.differences()}")

    def to_dict(self) -> dict:
        return {**asdict(self), "integers_ok": self.integers_ok}


def compare_integers(
    plan: RoundingPlan,
    stored: Mapping[str, torch.Tensor],
    scales: Mapping[str, torch.Tensor] | None = None,
    strict: bool = True,
    where: str = "the artifact",
    ranges: Mapping[str, tuple[int, int]] | None = None,
    zero_points: Mapping[str, torch.Tensor] | None = None,
) -> IntegerReport:
    """Compare ``stored`` integers (every quantized layer of the artifact, plan layout: output channel on
    axis 0) with ``plan``.

    A plan layer missing from ``stored`` counts as mismatched (-1); a stored layer the plan lacks is
    ``unplanned``. ``ranges``: the integer range the artifact clamps each layer to, checked against the
    plan's grid (``plan.meta.grids[name]`` where the plan has per-layer grids, else its scheme).
    ``scales`` / ``zero_points``: what the artifact dequantizes each layer with, read from the node that
    reads its integers. With ``strict`` any difference raises PlanMismatchError naming the layers.
    """
    report = IntegerReport(layers=len(plan.layers), matching=0)
    listed, constants = plan.meta.skipped, plan.meta.constants
    extra = set(stored) - set(plan.layers)
    report.skipped = sorted(extra & set(listed))
    report.constants = sorted(extra & set(constants) - set(listed))
    report.unplanned = sorted(extra - set(listed) - set(constants))
    for name, lp in plan.layers.items():
        got = stored.get(name)
        if got is None or tuple(got.shape) != tuple(lp.integers.shape):
            report.mismatched[name] = -1
            continue
        if ranges is not None and name in ranges:
            want = _planned_range(plan, name)
            if tuple(ranges[name]) != want:
                report.grid_mismatches[name] = f"stored on {list(ranges[name])}, planned on {list(want)}"
        diff = int((got.to(torch.int32) != lp.integers.to(torch.int32)).sum())
        if scales is not None and name in scales:
            if not torch.equal(
                scales[name].to(torch.float32).flatten(), lp.scale.to(torch.float32).flatten()
            ):
                report.scale_mismatches.append(name)
        if zero_points is not None and name in zero_points:
            held, want = zero_points[name].to(torch.int64).flatten(), lp.zero_point.to(torch.int64).flatten()
            if held.numel() == 1 and want.numel() > 1:  # one zero point for every channel
                held = held.expand(want.numel())
            elif want.numel() == 1 and held.numel() > 1:
                want = want.expand(held.numel())
            if held.shape != want.shape or not torch.equal(held, want):
                report.zero_point_mismatches.append(name)
        if diff:
            report.mismatched[name] = diff
        else:
            report.matching += 1
    if strict:
        report.check(plan, where, len(stored))
    return report


def _planned_range(plan: RoundingPlan, name: str) -> tuple[int, int]:
    grid = plan.meta.grids.get(name)
    if grid is not None:
        return int(grid["qmin"]), int(grid["qmax"])
    return plan.scheme.qmin, plan.scheme.qmax
