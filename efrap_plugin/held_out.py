"""Budget mode's measurement: top-1 disagreement with the float model on calibration inputs the
optimisation never sees. Backend-neutral: an adapter splits its calibration data with ``split_sizes``
and hands the loop a ``HeldOut`` that runs its own partially quantized model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .config import EFRAPConfig
from .errors import DataError

__all__ = ["MIN_HOLDOUT", "HeldOut", "Measurement", "inputs_needed", "split_calibration", "split_sizes"]

_CHUNK = 256

MIN_HOLDOUT = 16
"""Fewest held-out inputs a budget is measured on (one input is then 6.25%)."""


def split_sizes(available: int, config: EFRAPConfig) -> tuple[int, int]:
    """(inputs the optimisation uses, inputs held out) of ``available`` calibration inputs, in that order.

    Under a budget the held-out inputs are the last ``config.holdout`` when there are enough for both
    (``inputs_needed``), else the last ``min(config.holdout, available // 4)``, so a short supply leaves
    the optimisation three quarters; the optimisation takes up to ``calib_size`` of the others. Without
    one nothing is held out.
    """
    if config.budget is None:
        return min(config.calib_size, available), 0
    if config.holdout < MIN_HOLDOUT:
        raise DataError(
            f"EFRAPConfig.holdout (--holdout): budget mode measures on at least {MIN_HOLDOUT} held-out inputs "
            f"(one of them is then {100 / MIN_HOLDOUT:g}%), got {config.holdout}"
        )
    enough = available >= inputs_needed(config)
    held = config.holdout if enough else min(config.holdout, available // 4)
    if held < MIN_HOLDOUT:
        raise DataError(
            f"calibration data: budget mode holds out a quarter of the calibration inputs (at most "
            f"{config.holdout}) to measure the disagreement on, and {available} inputs leave {held}; "
            f"give at least {4 * MIN_HOLDOUT} inputs, or set budget=None (--budget off)"
        )
    return min(config.calib_size, available - held), held


def inputs_needed(config: EFRAPConfig) -> int:
    """Calibration inputs to read: ``calib_size``, and under a budget the held-out ones on top."""
    return config.calib_size + (config.holdout if config.budget is not None else 0)


def split_calibration(inputs: torch.Tensor, config: EFRAPConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration inputs (read with ``inputs_needed``) split into the optimisation's and the held-out
    ones (none without a budget)."""
    fit, held = split_sizes(inputs.shape[0], config)
    return inputs[:fit], inputs[inputs.shape[0] - held :]


class Measurement(NamedTuple):
    """One look at the held-out inputs, in percent of them."""

    disagreement: float
    """Top-1 decisions that differ from the float model's."""
    margin_risk: float
    """Inputs whose float class's margin (its output over the best other class) the quantized model
    halves or loses: confidence falling before decisions flip, a finer accuracy signal than disagreement."""


@dataclass
class HeldOut:
    """The float model's outputs on the held-out inputs, and ``predict`` giving the partially quantized
    model's outputs on the same inputs as the producer's model stands (installed layers included).

    Disagreement is taken on the argmax of the outputs' last axis: the class of a classifier.
    """

    reference: torch.Tensor
    predict: Callable[[], torch.Tensor]

    def __post_init__(self) -> None:
        if self.reference.dim() < 2 or self.reference.shape[-1] < 2:
            raise DataError(
                f"budget mode measures the top-1 decisions of a classifier, over the class scores on the last "
                f"axis of the model's first output, and the float model's first output has shape "
                f"{tuple(self.reference.shape)}: no classes to decide between. Set budget=None (--budget off) "
                "for a model that does not output class scores"
            )
        self._labels = self.reference.argmax(-1)
        self._margins = _margins(self.reference, self._labels)

    @classmethod
    def of_models(
        cls,
        float_forward: Callable[[torch.Tensor], torch.Tensor],
        quantized_forward: Callable[[torch.Tensor], torch.Tensor],
        inputs: torch.Tensor,
    ) -> HeldOut:
        """Torch flows: the float and the partially quantized model as callables, run in chunks."""

        def run(forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                return torch.cat(
                    [_output(forward(inputs[i : i + _CHUNK])) for i in range(0, len(inputs), _CHUNK)]
                )

        return cls(run(float_forward), lambda: run(quantized_forward))

    @property
    def resolution(self) -> float:
        """What one held-out decision weighs, in percent: changes this small are measurement noise."""
        return 100.0 / max(self._labels.numel(), 1)

    def measure(self) -> Measurement:
        """Disagreement and margin risk of the model as it stands, from one run of ``predict``."""
        outputs = self.predict()
        if outputs.shape != self.reference.shape:
            raise DataError(
                f"budget mode: the quantized model's outputs {tuple(outputs.shape)} do not match the float "
                f"model's {tuple(self.reference.shape)}"
            )
        changed = outputs.argmax(-1) != self._labels
        risky = _margins(outputs, self._labels) < 0.5 * self._margins
        return Measurement(100.0 * float(changed.float().mean()), 100.0 * float(risky.float().mean()))


def _margins(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's output for ``labels`` over its largest other output (negative: another class wins)."""
    picked = outputs.gather(-1, labels.unsqueeze(-1))
    others = outputs.scatter(-1, labels.unsqueeze(-1), float("-inf")).amax(-1)
    return picked.squeeze(-1) - others


def _output(value: Any) -> torch.Tensor:
    """A model's first output as a plain tensor (a QuantTensor's ``.value``, a tuple's first item)."""
    if isinstance(value, (tuple, list)):
        value = value[0]
    return (value if isinstance(value, torch.Tensor) else value.value).detach()
