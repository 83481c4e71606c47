"""Where a layer's cached inputs come from: one rule for every adapter.

"quantized": the partially quantized model (the reference: activation quantizers on, every earlier
layer's learned rounding in); "float": the float model; "mixed": each element from one or the other at
random (QDrop, Wei et al., ICLR 2022), so the learned rounding neither depends on the exact quantization
noise of the calibration images nor ignores it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from .errors import EFRAPError

__all__ = ["LAYER_INPUTS", "LayerInputs", "check_layer_inputs", "pick_layer_inputs"]

LayerInputs = Literal["quantized", "float", "mixed"]
LAYER_INPUTS: tuple[str, ...] = ("quantized", "float", "mixed")


def check_layer_inputs(choice: str) -> None:
    if choice not in LAYER_INPUTS:
        raise EFRAPError(f"layer_inputs: expected 'quantized', 'float' or 'mixed', got {choice!r}")


def pick_layer_inputs(
    choice: str, capture: Callable[[str], torch.Tensor], generator: torch.Generator
) -> torch.Tensor:
    """The inputs ``choice`` asks for; ``capture(kind)`` runs the calibration images through the
    "quantized" or the "float" model and returns what reaches the layer."""
    check_layer_inputs(choice)
    if choice != "mixed":
        return capture(choice)
    quantized, floating = capture("quantized"), capture("float")
    keep = torch.rand(quantized.shape, generator=generator) < 0.5
    return torch.where(keep, quantized, floating)
