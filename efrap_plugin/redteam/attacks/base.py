"""The template every QCB attack shares: validate, train the attack's objective, record metrics.

Each attack implements only ``run``; poisoning, checking and measurement live here once.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...data import LabeledData
from ...device import resolve_device
from ...errors import EFRAPError
from ...fake_quant import fake_quant_forward
from ...layers import check_finite_weights, quantizable_layers
from ...schemes import QuantScheme
from ..evaluate import evaluate
from ..training import train as fit_model
from ..triggers import PatchTrigger

__all__ = ["Attack", "AttackResult", "with_trigger_batch"]

log = logging.getLogger(__name__)


@dataclass
class AttackResult:
    """The backdoored float model and what was measured on it."""

    model: nn.Module
    attack: str
    trigger: PatchTrigger
    schemes: list[QuantScheme]
    seconds: float
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        """The JSON-able record written next to the model (attack.json)."""
        return {
            "attack": self.attack,
            "trigger": self.trigger.to_dict(),
            "target": self.trigger.target,
            "schemes": [s.to_dict() for s in self.schemes],
            "seconds": round(self.seconds, 2),
            "metrics": self.metrics,
        }


class Attack:
    """Base class: ``attack(model, train, trigger, schemes)`` returns an AttackResult; never mutates ``model``."""

    name = "attack"
    config_class: type = object
    """The attack's frozen config dataclass; ``Attack()`` uses its defaults."""

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_class()

    def __call__(
        self,
        model: nn.Module,
        train: LabeledData,
        trigger: PatchTrigger,
        schemes: QuantScheme | Sequence[QuantScheme],
        test: LabeledData | None = None,
        progress: bool = True,
        device: str | torch.device | None = None,
    ) -> AttackResult:
        """``device`` (e.g. "cuda") is where training runs; the result comes back on ``model``'s device."""
        schemes = [schemes] if isinstance(schemes, QuantScheme) else list(schemes)
        if not schemes or not all(isinstance(s, QuantScheme) for s in schemes):
            raise EFRAPError(f"schemes: expected one or more QuantScheme presets, got {schemes!r}")
        if not isinstance(train, LabeledData):
            raise EFRAPError(f"train: expected LabeledData (efrap_plugin.data), got {type(train).__name__}")
        if trigger.target >= train.num_classes:
            raise EFRAPError(
                f"trigger.target: {trigger.target} is not one of the {train.num_classes} classes"
            )
        trigger.apply(train.x[:1])  # the patch must fit the images
        quantizable_layers(model)
        check_finite_weights(model)
        home = next(model.parameters()).device
        victim = copy.deepcopy(model).to(resolve_device(device) if device is not None else home)
        start = time.perf_counter()
        victim = self.run(victim, train, trigger, schemes, progress).to(home)
        result = AttackResult(victim.eval(), self.name, trigger, schemes, time.perf_counter() - start)
        if test is not None:
            result.metrics = self.measure(victim, test, trigger, schemes)
            log.info("%s: %s", self.name, result.metrics)
        return result

    def run(
        self,
        model: nn.Module,
        train: LabeledData,
        trigger: PatchTrigger,
        schemes: list[QuantScheme],
        progress: bool,
    ) -> nn.Module:
        """Train ``model`` (a copy) into a QCB model. By default: ``fit`` on the attack's ``objective``."""
        return self.fit(model, train, lambda m, x, y: self.objective(m, x, y, trigger, schemes), progress)

    def objective(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        trigger: PatchTrigger,
        schemes: list[QuantScheme],
    ) -> torch.Tensor:
        """The attack's training loss on one clean batch (x, y); QAT attacks implement only this."""
        raise NotImplementedError

    def fit(self, model: nn.Module, data: LabeledData, loss_fn, progress: bool) -> nn.Module:
        """Adam on ``loss_fn`` with the config's epochs, lr, batch size, weight decay and seed.

        BatchNorm stays in eval mode, as in the references: the float and quantized paths share its
        statistics, and folding it at deployment sees the same values.
        """
        cfg = self.config
        return fit_model(
            model,
            data,
            cfg.epochs,
            cfg.lr,
            cfg.batch_size,
            cfg.weight_decay,
            "adam",
            loss_fn,
            seed=cfg.seed,
            progress=progress,
            desc=self.name,
            freeze_batchnorm=True,
        )

    @staticmethod
    def measure(
        model: nn.Module, test: LabeledData, trigger: PatchTrigger, schemes: list[QuantScheme]
    ) -> dict[str, dict[str, float]]:
        """Float metrics and the attack's own fake-quant metrics for each targeted scheme."""
        out = {"float": evaluate(model, test, trigger).to_dict()}
        for scheme in schemes:
            with torch.no_grad():
                m = evaluate(lambda x, s=scheme: fake_quant_forward(model, x, s), test, trigger)
            out[f"fake-{scheme.name}-{scheme.bits}bit"] = m.to_dict()
        return out


def with_trigger_batch(
    x: torch.Tensor, y: torch.Tensor, trigger: PatchTrigger
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triggered copies of a batch (all images) and their target labels."""
    return trigger.apply(x), torch.full_like(y, trigger.target)
