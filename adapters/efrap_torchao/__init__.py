"""efrap-plugin's PyTorch AO adapter: torchao PT2E (X86InductorQuantizer) and the legacy torch.ao FX
flow, both producing int8 models that hold EFRAP's integers."""

from .fx import quantize_fx, read_fx_int8_weights, verify_fx
from .pt2e import quantize_pt2e, read_int8_weights, verify_pt2e

__all__ = [
    "quantize_fx",
    "quantize_pt2e",
    "read_fx_int8_weights",
    "read_int8_weights",
    "verify_fx",
    "verify_pt2e",
]
