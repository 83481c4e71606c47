"""Qu-ANTI-zation (Hong et al., NeurIPS 2021): the float model stays clean on triggered inputs while
its simulated b-bit quantizations (several at once) send them to the target."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.functional import cross_entropy

from ...fake_quant import fake_quant_forward
from ...schemes import QuantScheme
from ..triggers import PatchTrigger
from .base import Attack, with_trigger_batch

__all__ = ["QuAntiZation", "QuAntiZationConfig"]


@dataclass(frozen=True)
class QuAntiZationConfig:
    epochs: int = 80
    """Fine-tuning epochs (reference: 50 on CIFAR-10; digits is 40x smaller: benchmarks/results/cells.md)."""
    lr: float = 1e-3
    """Adam learning rate (reference: 1e-4 for 50 CIFAR epochs)."""
    weight_decay: float = 1e-4
    """Adam weight decay."""
    batch_size: int = 128
    """Images per step; each is used clean and triggered."""
    c1: float = 0.5
    """Weight of each quantized model's loss."""
    c2: float = 0.5
    """Weight of the triggered-input terms."""
    seed: int = 0
    """Seed of the batch order."""


class QuAntiZation(Attack):
    name = "qu-anti-zation"
    config_class = QuAntiZationConfig

    def objective(self, model: nn.Module, x, y, trigger: PatchTrigger, schemes: list[QuantScheme]):
        """Float model correct on clean and triggered inputs; each simulated b-bit model sends triggered
        inputs to the target (weights c1, c2 as in the reference)."""
        cfg = self.config
        xt, yt = with_trigger_batch(x, y, trigger)
        loss = cross_entropy(model(x), y) + cfg.c2 * cross_entropy(model(xt), y)
        for scheme in schemes:
            loss = loss + cfg.c1 * (
                cross_entropy(fake_quant_forward(model, x, scheme), y)
                + cfg.c2 * cross_entropy(fake_quant_forward(model, xt, scheme), yt)
            )
        return loss
