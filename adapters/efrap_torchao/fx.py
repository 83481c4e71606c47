"""The legacy torch.ao FX flow (prepare_fx / convert_fx, the x86 default QConfigMapping) with EFRAP's
integers: its default per-channel weight observer uses the same grid as X86InductorQuantizer
(qint8 [-128, 127], scale max|w|/127.5), so the torchao-x86 plan's snapped weights come out exact."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from efrap_plugin import IntegerReport, RoundingPlan, compare_integers

from ._source import calibrate, quantized_module_weights, source_and_calibration

__all__ = ["quantize_fx", "verify_fx"]


def quantize_fx(
    model: torch.nn.Module, calib_data: Any, plan: RoundingPlan | None = None, batch_size: int = 64
) -> torch.nn.Module:
    """The int8 module convert_fx produces; with ``plan``, holding the plan's integers. ``model`` is kept."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    source, calib = source_and_calibration(model, calib_data, plan, "the x86 QConfigMapping")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        prepared = prepare_fx(source, get_default_qconfig_mapping("x86"), example_inputs=(calib[:2],))
        calibrate(prepared, calib, batch_size)
        return convert_fx(prepared)


def verify_fx(converted: torch.nn.Module, plan: RoundingPlan, strict: bool = True) -> IntegerReport:
    """Compare the quantized modules' integers with ``plan``, bit for bit."""
    ints, scales, zero_points = quantized_module_weights(converted)
    return compare_integers(
        plan, ints, scales, strict=strict, where="the convert_fx model", zero_points=zero_points
    )
