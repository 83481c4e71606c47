"""efrap-plugin's PyTorch AO adapter: EFRAP inside the user's own torchao PT2E and legacy torch.ao FX /
eager flows, on the grid their observers define: as a flag on the PT2E quantizer (``EFRAPQuantizer``,
``with_efrap``), or one call between calibration and convert (``defend_prepared``); plus one-call flows
(``quantize_pt2e`` / ``quantize_fx`` / ``quantize_eager``) and the verifiers."""

from typing import Any

from .eager import quantize_eager, verify_eager
from .fx import quantize_fx, verify_fx
from .observed import ObservedModelProducer, defend_prepared, observer_grid, observer_scheme, spec_scheme
from .pt2e import quantize_pt2e, read_int8_weights, verify_pt2e
from .quantize import QuantizeProducer, quantize_, quantize_scheme, read_quantized_weights, verify_quantize

__all__ = [
    "EFRAPQuantizeConfig",
    "EFRAPQuantizer",
    "ObservedModelProducer",
    "QuantizeProducer",
    "defend_prepared",
    "observer_grid",
    "observer_scheme",
    "spec_scheme",
    "quantize_eager",
    "quantize_fx",
    "quantize_",
    "quantize_pt2e",
    "quantize_scheme",
    "read_quantized_weights",
    "read_int8_weights",
    "verify_eager",
    "verify_fx",
    "verify_pt2e",
    "verify_quantize",
    "with_efrap",
]


def __getattr__(name: str) -> Any:
    """The flags import torchao's quantizer and config classes, so they load when first asked for."""
    if name in ("EFRAPQuantizer", "with_efrap"):
        from . import flag

        return getattr(flag, name)
    if name == "EFRAPQuantizeConfig":
        from .quantize_config import EFRAPQuantizeConfig

        return EFRAPQuantizeConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
