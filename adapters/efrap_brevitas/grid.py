"""The integer grid of a Brevitas weight quantizer, read from the quantizer itself."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from efrap_plugin import EFRAPError, QuantScheme

__all__ = ["LayerGrid", "layer_grid", "quantizer_scheme"]


@dataclass(frozen=True)
class LayerGrid:
    """One layer's integer grid, as its Brevitas weight quantizer defines it."""

    scheme: QuantScheme
    scale: torch.Tensor  # [C] along ``axis`` (or [1])
    zero_point: torch.Tensor
    axis: int  # the weight axis the scales run along (0 for Conv / Linear, 1 for ConvTranspose)


def layer_grid(layer: nn.Module, name: str) -> LayerGrid:
    """The grid ``layer``'s weight quantizer rounds to. Raises EFRAPError (naming the layer and why)
    for grids EFRAP does not learn on: float or non-integer formats, per-group scales, under 2 bits."""
    from brevitas.function.ops import max_int, min_int
    from brevitas.quant_tensor import IntQuantTensor

    with torch.no_grad():
        qt = layer.quant_weight()
    if not isinstance(qt, IntQuantTensor):
        raise EFRAPError(f"layer {name!r}: weights quantized to {type(qt).__name__}, not integers")
    bits = int(round(float(qt.bit_width)))
    if not 2 <= bits <= 8:
        raise EFRAPError(f"layer {name!r}: {bits}-bit weights; EFRAP defends 2- to 8-bit grids")
    narrow = bool(layer.weight_quant.is_narrow_range)
    signed = bool(qt.signed)
    width = torch.tensor(float(bits))
    qmin, qmax = int(min_int(signed, narrow, width)), int(max_int(signed, narrow, width))
    scale = qt.scale.detach().to(torch.float32)
    zero_point = torch.broadcast_to(qt.zero_point.detach().to(torch.float32), scale.shape)
    if not torch.equal(zero_point, zero_point.round()):
        raise EFRAPError(f"layer {name!r}: a non-integer zero point; EFRAP needs integer zero points")
    weight = layer.weight
    axes = [d for d in range(scale.dim()) if scale.shape[d] != 1]
    if scale.numel() == 1:
        axis, per_channel = 0, False
    elif len(axes) == 1 and scale.dim() == weight.dim() and scale.shape[axes[0]] == weight.shape[axes[0]]:
        axis, per_channel = axes[0], True
    else:
        raise EFRAPError(
            f"layer {name!r}: scales of shape {tuple(scale.shape)} for a weight of shape "
            f"{tuple(weight.shape)} (per-group); EFRAP learns per-tensor or per-channel grids"
        )
    symmetric = qmin < 0 and not bool(zero_point.any())
    scheme = QuantScheme(
        name="brevitas",
        bits=bits,
        qmin=qmin,
        qmax=qmax,
        per_channel=per_channel,
        range_rule="absmax" if symmetric else "minmax",
        scale_precision="float32",
        folds_batchnorm=False,
    )
    return LayerGrid(scheme, scale.reshape(-1), zero_point.reshape(-1).to(torch.int32), axis)


def quantizer_scheme(weight_quant: Any, folds_batchnorm: bool = True, **layer_options: Any) -> QuantScheme:
    """The grid a Brevitas weight quantizer (``Int8WeightPerChannelFloat``, ``.let(...)`` of one, or the
    user's own) rounds a Conv weight to, as a QuantScheme: what an attack aimed at that quantizer
    protects. ``layer_options`` are the layer keywords the user passes (``weight_bit_width=4``);
    ``folds_batchnorm``: whether the user's flow folds BN first (``preprocess_for_quantize`` does).
    """
    import brevitas.nn as qnn
    from brevitas.inject.enum import RestrictValueType

    try:
        probe = qnn.QuantConv2d(4, 4, 3, weight_quant=weight_quant, **layer_options)
    except Exception as exc:  # Brevitas' injector reports a bad quantizer as a DependencyError
        raise EFRAPError(
            f"weight_quant: Brevitas cannot build a layer with {weight_quant!r} ({exc})"
        ) from None
    grid = layer_grid(probe, "weight_quant")
    restrict = getattr(weight_quant, "restrict_scaling_type", None) if hasattr(weight_quant, "let") else None
    return replace(
        grid.scheme,
        folds_batchnorm=folds_batchnorm,
        power_of_two_scale=restrict == RestrictValueType.POWER_OF_TWO and grid.scheme.range_rule == "absmax",
    )
