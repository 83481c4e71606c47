"""The legacy torch.ao eager-mode flow (QuantStub / prepare / convert, the x86 qconfig) with EFRAP's
integers: its per-channel weight observer is the torchao-x86 grid, so the snapped weights come out exact.

Eager mode swaps modules, so the model's tensor arithmetic must be quantization-aware: a residual
``a + b`` needs ``FloatFunctional``. Such a model is refused with a pointer to the FX or PT2E flow,
which rewrite the graph instead.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from efrap_plugin import EFRAPError, IntegerReport, ModelError, RoundingPlan, compare_integers, relu_after

from ._source import calibrate, quantized_module_weights, source_and_calibration

__all__ = ["quantize_eager", "verify_eager"]

_WRAPPED = "module."


def quantize_eager(
    model: nn.Module, calib_data: Any, plan: RoundingPlan | None = None, batch_size: int = 64
) -> nn.Module:
    """The int8 module torch.ao's eager ``prepare``/``convert`` produce; with ``plan``, holding its integers.

    ``model`` is kept. BatchNorm is folded and Conv/Linear + ReLU fused first, as an eager-mode script
    does with ``fuse_modules``; a model without its own QuantStub is wrapped in ``QuantWrapper``.
    """
    from torch.ao.quantization import (
        QuantStub,
        QuantWrapper,
        convert,
        fuse_modules,
        get_default_qconfig,
        prepare,
    )

    source, calib = source_and_calibration(model, calib_data, plan, "the eager x86 qconfig")
    pairs = [[layer, relu] for layer, relu in relu_after(source).items() if relu is not None]
    if pairs:
        source = fuse_modules(source, pairs)
    if not any(isinstance(m, QuantStub) for m in source.modules()):
        source = QuantWrapper(source)
    source.eval()
    source.qconfig = get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
        try:
            prepared = prepare(source)
        except AssertionError as exc:  # torch.ao's refusals are bare asserts
            raise ModelError(
                f"model: torch.ao's eager prepare refuses {type(model).__name__} ({str(exc) or 'AssertionError'}); "
                "quantize it with quantize_fx or quantize_pt2e, or with your own qconfig per module"
            ) from None
        calibrate(prepared, calib, batch_size)
        converted = convert(prepared)
        try:
            with torch.no_grad():
                converted(calib[:1])
        except (NotImplementedError, RuntimeError) as exc:
            raise EFRAPError(
                f"model: {type(model).__name__} does tensor arithmetic eager mode cannot run on quantized "
                f"tensors ({str(exc).splitlines()[0][:120]}); use FloatFunctional for adds and concats, "
                "or quantize_fx / quantize_pt2e, which handle them"
            ) from None
    return converted


def verify_eager(converted: nn.Module, plan: RoundingPlan, strict: bool = True) -> IntegerReport:
    """Compare the quantized modules' integers, scales and zero points with ``plan``, bit for bit.

    quantize_eager wraps the user's model in a QuantWrapper and names layers as the user's model does;
    a plan learned on a wrapped model (``defend_prepared`` on the user's own QuantWrapper) keeps the
    wrapper's ``module.`` prefix, and is read back with it."""
    wrapped = bool(plan.layers) and all(name.startswith(_WRAPPED) for name in plan.layers)
    ints, scales, zero_points = quantized_module_weights(converted, strip_prefix="" if wrapped else _WRAPPED)
    return compare_integers(
        plan, ints, scales, strict=strict, where="the eager-mode converted model", zero_points=zero_points
    )
