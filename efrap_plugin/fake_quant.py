"""Simulated (fake) quantization of a torch model on a backend's grid, with straight-through gradients.

Attacks train against it; it must land on exactly the grid the backend uses (see schemes.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .layers import QUANTIZABLE
from .schemes import QuantScheme, round_ste

__all__ = ["fake_quant_forward", "fake_quantize_activation"]


def fake_quantize_activation(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-tensor affine unsigned quantization over the batch's own [min, max] (0 included), STE."""
    qmax = 2**bits - 1
    lo = x.detach().min().clamp(max=0)
    hi = x.detach().max().clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zp = torch.round(-lo / scale)
    q = (round_ste(x / scale) + zp).clamp(0, qmax)
    return (q - zp) * scale


def fake_quant_forward(
    model: nn.Module, x: torch.Tensor, scheme: QuantScheme, activations: bool = True
) -> torch.Tensor:
    """The model's output with every Conv/Linear weight on ``scheme``'s nearest grid (and inputs quantized)."""
    params = {
        f"{name}.weight" if name else "weight": scheme.fake_quantize(module.weight)
        for name, module in model.named_modules()
        if isinstance(module, QUANTIZABLE)
    }
    hooks = []
    if activations:
        for module in model.modules():
            if isinstance(module, QUANTIZABLE):
                hooks.append(
                    module.register_forward_pre_hook(
                        lambda _m, inp: (fake_quantize_activation(inp[0], scheme.act_bits),) + tuple(inp[1:])
                    )
                )
    try:
        return functional_call(model, params, (x,), strict=False)
    finally:
        for h in hooks:
            h.remove()
