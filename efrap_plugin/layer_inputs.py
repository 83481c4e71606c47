"""Where a layer's cached inputs come from: one rule for every adapter.

"quantized": the partially quantized model (the reference: activation quantizers on, every earlier
layer's learned rounding in); "float": the float model; "mixed": each element from one or the other at
random (QDrop, Wei et al., ICLR 2022), so the learned rounding neither depends on the exact quantization
noise of the calibration images nor ignores it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import LAYER_INPUTS, LayerInputs
from .errors import EFRAPError

__all__ = ["LAYER_INPUTS", "LayerInputs", "check_layer_inputs", "mix_layer_inputs", "pick_layer_inputs"]

_MIX_ROWS = 64
"""Rows of the mixing mask drawn at once: the same draws as one mask for all rows (the generator runs
serially), without a mask as large as the layer's inputs."""


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
    quantized = capture("quantized")
    return mix_layer_inputs(quantized, capture("float"), generator)


def mix_layer_inputs(
    quantized: torch.Tensor,
    floating: torch.Tensor,
    generator: torch.Generator,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The "mixed" inputs: each element from ``quantized`` or ``floating``, at random. ``out`` may be
    ``floating`` itself when nothing else reads it (a producer that captured it for this layer alone):
    the mix then takes no memory of its own."""
    mixed = torch.empty_like(quantized) if out is None else out
    for i in range(0, quantized.shape[0], _MIX_ROWS):  # the random mask a block of rows at a time
        rows = slice(i, i + _MIX_ROWS)
        keep = torch.rand(quantized[rows].shape, generator=generator) < 0.5
        torch.where(keep, quantized[rows], floating[rows], out=mixed[rows])
    return mixed
