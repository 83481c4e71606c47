"""Budget mode's measurement: top-1 disagreement with the float model on calibration inputs the
optimisation never sees. Backend-neutral: ``efrap_plugin.run`` splits a producer's calibration data with
``held_out_indices`` and hands the loop the ``HeldOut`` that runs the producer's partially quantized
model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .config import EFRAPConfig
from .errors import DataError, EFRAPError

__all__ = [
    "MIN_HOLDOUT",
    "first_outputs",
    "HeldOut",
    "Measurement",
    "held_out_indices",
    "inputs_needed",
    "split_sizes",
    "take_rows",
]

_CHUNK = 256

MIN_HOLDOUT = 16
"""Fewest held-out inputs a budget is measured on (one input is then 6.25%)."""


def split_sizes(available: int, config: EFRAPConfig) -> tuple[int, int]:
    """(inputs the optimisation uses, inputs held out) of ``available`` calibration inputs, in that order.

    Under a budget ``config.holdout`` inputs are held out when there are enough for both
    (``inputs_needed``), else ``min(config.holdout, available // 4)``, so a short supply leaves the
    optimisation three quarters; the optimisation takes up to ``calib_size`` of the others
    (``held_out_indices`` says which). Without one nothing is held out.
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


def held_out_indices(
    available: int, config: EFRAPConfig, float_outputs: Callable[[], torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of (the inputs the optimisation uses, the held-out ones) among ``available`` calibration
    inputs, each in the order supplied (``split_sizes`` gives how many).

    ``config.holdout_choice`` "boundary" holds out the inputs with the smallest margins of the float
    model's class over the best other (``float_outputs`` gives the float model's first output on every
    input, run only then; the lowest position's margin counts where it scores several), "last" the last
    ones; the optimisation takes the first of the others.
    """
    fit, held = split_sizes(available, config)
    if not held or config.holdout_choice == "last":
        return torch.arange(fit), torch.arange(available - held, available)
    outputs = None if float_outputs is None else float_outputs()
    if outputs is None or outputs.shape[0] % available:
        raise EFRAPError(
            "budget mode: holdout_choice='boundary' picks the held-out inputs by the float model's output on "
            f"each of the {available} calibration inputs, and this producer gave "
            f"{'none' if outputs is None else outputs.shape[0]}; set holdout_choice='last'"
        )
    _check_class_scores(outputs)
    margins = _margins(outputs, outputs.argmax(-1)).reshape(available, -1).amin(1)
    held_idx = torch.argsort(margins, stable=True)[:held].sort().values
    rest = torch.ones(available, dtype=torch.bool)
    rest[held_idx] = False
    return rest.nonzero().squeeze(1)[:fit], held_idx


def take_rows(inputs: Any, idx: torch.Tensor) -> Any:
    """``inputs[idx]`` for sorted, distinct ``idx``: a view where they are one run of rows (no copy of
    calibration data that may be large), else the rows gathered."""
    if len(idx) and int(idx[-1]) - int(idx[0]) + 1 == len(idx):
        return inputs[int(idx[0]) : int(idx[-1]) + 1]
    return inputs[idx.numpy() if not isinstance(inputs, torch.Tensor) else idx]


def first_outputs(forward: Callable[[torch.Tensor], Any], inputs: torch.Tensor) -> torch.Tensor:
    """``forward``'s first output on ``inputs`` (a QuantTensor's value, a tuple's first item), run in
    chunks without gradients."""
    with torch.no_grad():
        return torch.cat([_output(forward(inputs[i : i + _CHUNK])) for i in range(0, len(inputs), _CHUNK)])


def _check_class_scores(reference: torch.Tensor) -> None:
    """Budget mode reads a classifier's decisions: class scores on the last axis of the first output."""
    if reference.dim() < 2 or reference.shape[-1] < 2:
        raise DataError(
            f"budget mode measures the top-1 decisions of a classifier, over the class scores on the last "
            f"axis of the model's first output, and the float model's first output has shape "
            f"{tuple(reference.shape)}: no classes to decide between. Set budget=None (--budget off) "
            "for a model that does not output class scores"
        )


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
        _check_class_scores(self.reference)
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
        return cls(first_outputs(float_forward, inputs), lambda: first_outputs(quantized_forward, inputs))

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
