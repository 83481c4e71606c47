"""EFRAP's rounding as Brevitas' own: a ``float_to_int_impl`` that returns the learned integers.

Brevitas rounds a weight in ``IntQuant.to_int``: ``float_to_int_impl(w / scale + zero_point)``, then
clamps. Putting the learned integers there (the LEARNED_ROUND route) leaves the user's quantizer,
scale, bit width and float weights untouched, so their model calibrates, evaluates, trains and exports
(``export_onnx_qcdq`` reads ``quant_weight().int()``) exactly as before, on EFRAP's integers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from efrap_plugin import EFRAPError

__all__ = ["EFRAPRound", "install_rounding", "rounding_of", "with_efrap"]

# A learned integer is floor or ceil of w / scale + zero point: farther than this from the current
# value, the weight changed since the defense (fine-tuning), and nearest rounding takes over there.
_REACH = 1.0 + 1e-3


class EFRAPRound(nn.Module):
    """Round to the integers EFRAP learned for this weight; to nearest until it has run.

    The integers are a non-persistent buffer: Brevitas re-initialises quantizers from state dicts
    (``init_tensor_quant(preserve_state_dict=True)``), which fails on keys it does not know. Save
    the plan (``RoundingPlan.save``) and reinstall it with ``efrap_brevitas.apply_plan``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("integers", torch.empty(0), persistent=False)

    @property
    def learned(self) -> bool:
        return self.integers.numel() > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nearest = torch.round(x)
        if not self.learned or self.integers.shape != x.shape:
            # not this weight: quantizers share their rounding module with, say, their zero point's
            return x + (nearest - x).detach()
        q = self.integers.to(x.dtype)
        rounded = torch.where((x - q).abs() <= _REACH, q, nearest)
        return x + (rounded - x).detach()  # straight-through, like Brevitas' RoundSte

    def extra_repr(self) -> str:
        return f"learned={self.learned}"


def with_efrap(weight_quant: Any) -> Any:
    """The user's weight quantizer with EFRAP's rounding in: the config flag.

    ``QuantConv2d(..., weight_quant=with_efrap(Int8WeightPerChannelFloat))`` rounds to nearest, as
    the quantizer did, until ``defend_quant_model`` has learned this layer's integers.
    """
    if not hasattr(weight_quant, "let"):
        raise EFRAPError(
            f"with_efrap: expected a Brevitas weight quantizer (an injector such as "
            f"Int8WeightPerChannelFloat), got {weight_quant!r}"
        )
    return weight_quant.let(float_to_int_impl=EFRAPRound)


def _int_quant(layer: nn.Module) -> nn.Module | None:
    tensor_quant = getattr(layer.weight_quant, "tensor_quant", None)
    int_quant = getattr(tensor_quant, "int_quant", None)
    return int_quant if hasattr(int_quant, "float_to_int_impl") else None


def rounding_of(layer: nn.Module) -> EFRAPRound | None:
    """The layer's EFRAPRound, if its weight quantizer has one."""
    int_quant = _int_quant(layer)
    impl = getattr(int_quant, "float_to_int_impl", None)
    return impl if isinstance(impl, EFRAPRound) else None


def install_rounding(layer: nn.Module, integers: torch.Tensor) -> None:
    """Make ``layer``'s weight quantizer round to ``integers`` (weight layout), through its
    ``float_to_int_impl``; an EFRAPRound is put in where the user's quantizer has its own rounding."""
    int_quant = _int_quant(layer)
    if int_quant is None:
        raise EFRAPError(
            f"{type(layer).__name__}: its weight quantizer has no integer rounding (float_to_int_impl) "
            "to learn; EFRAP defends integer weight quantizers"
        )
    rounding = rounding_of(layer)
    if rounding is None:
        rounding = EFRAPRound()
        int_quant.float_to_int_impl = rounding
    weight = layer.weight
    rounding.integers = integers.detach().to(device=weight.device, dtype=torch.float32).reshape(weight.shape)
