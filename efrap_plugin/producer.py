"""The contract between the core and an adapter: a producer of per-layer problems.

Every route into EFRAP (``defend`` on a torch model, the torchao / torch.ao observers, the user's Brevitas
quantizers, onnxruntime's QDQ graph) is a ``LayerProducer``: it finds the quantized layers and their
grids, gives each layer's inputs and float targets as a ``LayerProblem`` when the loop asks (by then
the earlier layers' learned integers are installed), installs integers, and, for budget mode, runs its
float and partially quantized model on held-out inputs. ``efrap_plugin.defense.run`` owns the rest: the
config, the calibration split, the loop, the plan and its metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .config import EFRAPConfig
from .data import as_calibration
from .errors import DataError, EFRAPError, ModelError
from .held_out import HeldOut, take_rows
from .plan import LayerPlan
from .schemes import QuantScheme

__all__ = ["FoundLayers", "Honours", "LayerProblem", "LayerProducer", "ProducedPlan", "TensorCalibration"]


@dataclass
class LayerProblem:
    """One layer's rounding problem.

    ``forward(x, w)`` computes the layer's output from inputs and a weight (the activation-preservation
    unit); ``inputs`` come from the partially quantized model, ``targets`` from the float model.
    ``install(integers)``, where given, puts the learned integers into the producer's partially
    quantized model before the next layer's inputs are captured.
    """

    name: str
    weight: torch.Tensor
    scheme: QuantScheme
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    inputs: torch.Tensor
    targets: torch.Tensor
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    install: Callable[[torch.Tensor], None] | None = None

    def __post_init__(self) -> None:
        if not torch.isfinite(self.weight).all():
            raise EFRAPError(
                f"layer {self.name!r}: weight holds NaN or Inf values; fix the model before defending"
            )
        if self.inputs.shape[0] != self.targets.shape[0] or self.inputs.shape[0] == 0:
            raise EFRAPError(
                f"layer {self.name!r}: expected as many cached inputs as targets (> 0), "
                f"got {self.inputs.shape[0]} and {self.targets.shape[0]}"
            )
        for what, tensor in (
            ("inputs (from the partially quantized model)", self.inputs),
            ("float outputs", self.targets),
        ):
            if tensor.is_floating_point() and not _all_finite(tensor):
                raise DataError(
                    f"layer {self.name!r}: its {what} on the calibration data hold NaN or Inf (values past "
                    "float32's range); pass calibration inputs scaled as the model expects"
                )
        if self.weight.numel() == 0 or self.targets[0].numel() == 0:
            raise ModelError(
                f"layer {self.name!r}: its weight {tuple(self.weight.shape)} or its output per input "
                f"{tuple(self.targets.shape[1:])} has no elements, so there is nothing to round; fix the "
                "layer's shape or remove it"
            )
        if self.scale is None or self.zero_point is None:
            self.scale, self.zero_point = self.scheme.qparams(self.weight)


def _all_finite(tensor: torch.Tensor, rows: int = 256) -> bool:
    """No NaN or Inf in ``tensor``, looked at ``rows`` leading rows at a time (a layer's cached activations
    are the largest allocation of a defense: no full-size mask of them)."""
    return all(bool(torch.isfinite(tensor[i : i + rows]).all()) for i in range(0, tensor.shape[0], rows))


def _all_finite(tensor: torch.Tensor, rows: int = 256) -> bool:
    """No NaN or Inf in ``tensor``, looked at ``rows`` leading rows at a time (a layer's cached activations
    are the largest allocation of a defense: no full-size mask of them)."""
    return all(bool(torch.isfinite(tensor[i : i + rows]).all()) for i in range(0, tensor.shape[0], rows))


@dataclass(frozen=True)
class Honours:
    """The EFRAPConfig choices a producer carries out, its default first, and why it refuses the others
    (by field: "layer_inputs", "unit")."""

    layer_inputs: tuple[str, ...]
    units: tuple[str, ...]
    why_not: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FoundLayers:
    """What a producer learns, in execution order, and what it names instead."""

    names: Sequence[str]
    skipped: Mapping[str, str] = field(default_factory=dict)
    """Quantized layers left at the backend's rounding, with the reason (``PlanMeta.skipped``)."""
    constants: Mapping[str, str] = field(default_factory=dict)
    """Quantized tensors that are no layer's weight, with their readers (``PlanMeta.constants``)."""
    readers: Sequence[tuple[str, str]] = ()
    """(weight, reader) for every learned layer: a weight several layers read is warned of."""


@dataclass(frozen=True)
class ProducedPlan:
    """What a producer hands back for the plan: the layers in its backend's own layout, the scheme the
    plan is filed under, and each layer's grid / storage where they differ by layer."""

    scheme: QuantScheme
    layers: Mapping[str, LayerPlan]
    grids: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    layout: Mapping[str, Mapping[str, Any]] | None = None


class LayerProducer(Protocol):
    """One route into EFRAP, as ``run`` drives it: in this order, inside ``running()``,
    ``calibration`` -> ``find_layers`` -> (budget mode: ``float_outputs``) -> ``problems`` (the first
    problem built) -> (budget mode: ``held_out``) -> the other problems -> ``finish``. Calibration is
    the producer's own form (a tensor, a list of ONNX feeds); ``rows`` counts it and ``take`` picks
    rows of it."""

    flow: str
    """``PlanMeta.flow``: "torch", "pt2e", "torch.ao", "brevitas", "onnxruntime"."""
    source: str
    """``RoundingPlan.source``: which adapter applies and verifies the plan."""
    honours: Honours

    def running(self) -> AbstractContextManager[None]:
        """The whole defense runs inside it: eval mode, the user's model restored on failure."""

    def calibration(self, data: Any, rows: int) -> Any:
        """Up to ``rows`` calibration inputs read from what the user passed, checked."""

    def rows(self, calib: Any) -> int:
        """How many inputs ``calib`` holds."""

    def take(self, calib: Any, idx: torch.Tensor) -> Any:
        """The inputs at sorted, distinct ``idx``."""

    def find_layers(self, calib: Any, config: EFRAPConfig) -> FoundLayers:
        """The layers to learn (refused with the fix when there is nothing to learn and that is wrong)."""

    def float_outputs(self, calib: Any) -> torch.Tensor:
        """The float model's first output on every input of ``calib`` (budget mode picks its held-out
        inputs by it)."""

    def problems(self, calib: Any, config: EFRAPConfig) -> Iterator[LayerProblem]:
        """One problem per found layer, in order, each built when asked (after the previous layer's
        integers were installed)."""

    def held_out(self, held: Any) -> HeldOut:
        """Budget mode: the float and the partially quantized model on the held-out inputs; asked for
        once the first problem was built (its set-up done), before anything is installed."""

    def finish(self, learned: dict[str, LayerPlan]) -> ProducedPlan:
        """The learned layers in the backend's layout (a ConvTranspose's channels back on axis 1)."""


class TensorCalibration:
    """The torch routes' calibration: one tensor of inputs, read from whatever the user passes
    (``as_calibration``: a tensor, an array, an .npz path, labeled data, an iterable of batches)."""

    def calibration(self, data: Any, rows: int) -> torch.Tensor:
        return as_calibration(data, rows)

    def rows(self, calib: torch.Tensor) -> int:
        return int(calib.shape[0])

    def take(self, calib: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return take_rows(calib, idx)
