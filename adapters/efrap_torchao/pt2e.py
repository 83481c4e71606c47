"""torchao PT2E (prepare_pt2e / convert_pt2e, X86InductorQuantizer) with EFRAP's integers.

The defended flow snaps the weights to the plan's grid, then runs the stock PT2E flow untouched: its
PerChannelMinMaxObserver recomputes the very same scales and its quantize_per_channel rounds to the
plan's integers, which are then read back from the int8 constants convert_pt2e folds in.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from efrap_plugin import IntegerReport, RoundingPlan, compare_integers

from ._source import calibrate, source_and_calibration

__all__ = ["quantize_pt2e", "read_int8_weights", "verify_pt2e"]

log = logging.getLogger(__name__)


def _quantizer():
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    return X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())


def quantize_pt2e(
    model: torch.nn.Module, calib_data: Any, plan: RoundingPlan | None = None, batch_size: int = 64
) -> torch.fx.GraphModule:
    """The int8 model torchao's PT2E flow produces; with ``plan``, holding the plan's integers.

    ``model`` is not modified. Without a plan this is the stock (nearest-rounding) flow.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    source, calib = source_and_calibration(model, calib_data, plan, "X86InductorQuantizer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        exported = torch.export.export(
            source, (calib[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
        ).module()
        prepared = prepare_pt2e(exported, _quantizer())
        calibrate(prepared, calib, batch_size)
        return convert_pt2e(prepared)


def read_int8_weights(
    converted: torch.fx.GraphModule,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Integer weights and their scales from a converted PT2E model, per channel or per tensor, keyed by
    the source module's name. Only dequantize nodes fed by a constant (a weight) are read."""
    ints, scales, _ = _int8_weight_grids(converted)
    return ints, scales


def _int8_weight_grids(
    converted: torch.fx.GraphModule,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``read_int8_weights``, and the zero points each weight's dequantize node reads."""
    ints, scales, zero_points = {}, {}, {}

    def value(arg):
        return getattr(converted, arg.target) if getattr(arg, "op", None) == "get_attr" else arg

    for node in converted.graph.nodes:
        target = str(node.target) if node.op == "call_function" else ""
        if "dequantize_per_channel" not in target and "dequantize_per_tensor" not in target:
            continue
        q_node, s_arg, z_arg = node.args[0], node.args[1], node.args[2]
        if getattr(q_node, "op", None) != "get_attr":
            continue
        users = [u for u in node.users if u.meta.get("nn_module_stack")]
        if not users:
            continue
        name = list(users[0].meta["nn_module_stack"].values())[-1][0]
        ints[name] = getattr(converted, q_node.target).to(torch.int32)
        scales[name] = torch.as_tensor(value(s_arg), dtype=torch.float32).reshape(-1)
        zero_points[name] = torch.as_tensor(value(z_arg)).to(torch.int64).reshape(-1)
    return ints, scales, zero_points


def verify_pt2e(converted: torch.fx.GraphModule, plan: RoundingPlan, strict: bool = True) -> IntegerReport:
    """Compare the int8 constants of ``converted`` with ``plan``, bit for bit."""
    ints, scales, zero_points = _int8_weight_grids(converted)
    return compare_integers(
        plan, ints, scales, strict=strict, where="the PT2E-converted model", zero_points=zero_points
    )
