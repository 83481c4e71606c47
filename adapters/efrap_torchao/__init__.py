"""efrap-plugin's torchao adapter: PT2E (X86InductorQuantizer) int8 models holding EFRAP's integers."""

from .pt2e import quantize_pt2e, read_int8_weights, verify_pt2e

__all__ = ["quantize_pt2e", "read_int8_weights", "verify_pt2e"]
