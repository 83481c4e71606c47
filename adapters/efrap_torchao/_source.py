"""What both PyTorch AO flows start from: the snapped model (with a plan) or the BN-folded one."""

from __future__ import annotations

from typing import Any

import torch

from efrap_plugin import EFRAPError, QuantScheme, RoundingPlan, as_calibration, prepare_model


def source_and_calibration(
    model: torch.nn.Module, calib_data: Any, plan: RoundingPlan | None, flow: str
) -> tuple[torch.nn.Module, torch.Tensor]:
    """The eval-mode model to hand to ``flow`` and the calibration images; refuses a plan for another grid."""
    if plan is not None and plan.scheme.name != "torchao-x86":
        raise EFRAPError(
            f"plan: made for the {plan.scheme.name!r} scheme; {flow} needs scheme='torchao-x86' "
            "(range [-128, 127], scale max|w|/127.5)"
        )
    source = plan.snap(model) if plan is not None else prepare_model(model, QuantScheme.torchao_x86())
    return source.eval(), as_calibration(calib_data)


@torch.no_grad()
def calibrate(prepared: torch.nn.Module, calib: torch.Tensor, batch_size: int) -> None:
    for i in range(0, calib.shape[0], batch_size):
        prepared(calib[i : i + batch_size])


def quantized_module_weights(
    converted: torch.nn.Module, strip_prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Integer weights, scales and zero points (per channel or per tensor) of torch.ao's quantized
    modules, by module name."""
    ints, scales, zero_points = {}, {}, {}
    for name, module in converted.named_modules():
        weight = getattr(module, "weight", None)
        if not callable(weight):
            continue
        w = weight()
        if isinstance(w, torch.Tensor) and w.is_quantized:
            key = name.removeprefix(strip_prefix)
            ints[key] = w.int_repr().to(torch.int32)
            per_channel = w.qscheme() in (
                torch.per_channel_affine,
                torch.per_channel_symmetric,
                torch.per_channel_affine_float_qparams,  # quantized Embedding tables
            )
            scale = w.q_per_channel_scales() if per_channel else torch.tensor([w.q_scale()])
            scales[key] = scale.to(torch.float32)
            if w.qscheme() != torch.per_channel_affine_float_qparams:  # a table's offsets are floats
                zero_point = (
                    w.q_per_channel_zero_points() if per_channel else torch.tensor([w.q_zero_point()])
                )
                zero_points[key] = zero_point.to(torch.int64)
    return ints, scales, zero_points
