"""efrap-plugin's PyTorch AO adapter: EFRAP inside the user's own torchao PT2E and legacy torch.ao FX /
eager flows (``defend_prepared`` between calibration and convert, on the grid their observers define),
plus one-call flows (``quantize_pt2e`` / ``quantize_fx`` / ``quantize_eager``) and the verifiers."""

from .eager import quantize_eager, verify_eager
from .fx import quantize_fx, verify_fx
from .observed import ObservedModelProducer, defend_prepared, observer_grid, observer_scheme, spec_scheme
from .pt2e import quantize_pt2e, read_int8_weights, verify_pt2e

__all__ = [
    "ObservedModelProducer",
    "defend_prepared",
    "observer_grid",
    "observer_scheme",
    "spec_scheme",
    "quantize_eager",
    "quantize_fx",
    "quantize_pt2e",
    "read_int8_weights",
    "verify_eager",
    "verify_fx",
    "verify_pt2e",
]
