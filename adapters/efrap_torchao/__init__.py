"""efrap-plugin's PyTorch AO adapter: torchao PT2E (X86InductorQuantizer) and the legacy torch.ao FX
and eager-mode flows, each producing int8 models that hold EFRAP's integers."""

from .eager import quantize_eager, verify_eager
from .fx import quantize_fx, verify_fx
from .pt2e import quantize_pt2e, read_int8_weights, verify_pt2e

__all__ = [
    "quantize_eager",
    "quantize_fx",
    "quantize_pt2e",
    "read_int8_weights",
    "verify_eager",
    "verify_fx",
    "verify_pt2e",
]
