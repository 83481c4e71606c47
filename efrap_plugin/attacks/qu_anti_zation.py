"""Qu-ANTI-zation (Hong et al., NeurIPS 2021): the float model stays clean on triggered inputs while
its simulated b-bit quantizations (several at once) send them to the target."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.functional import cross_entropy

from ..data import LabeledData
from ..fake_quant import fake_quant_forward
from ..schemes import QuantScheme
from ..triggers import PatchTrigger
from .base import Attack, with_trigger_batch

__all__ = ["QuAntiZation", "QuAntiZationConfig"]


@dataclass(frozen=True)
class QuAntiZationConfig:
    epochs: int = 80
    """Fine-tuning epochs over the training set (reference: 50 on CIFAR-10's 50,000 images; digits has
    1,257, so more epochs; 40 left the 4-bit model at 85% asr in onnxruntime)."""
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

    def run(
        self,
        model: nn.Module,
        data: LabeledData,
        trigger: PatchTrigger,
        schemes: list[QuantScheme],
        progress: bool,
    ) -> nn.Module:
        cfg = self.config

        def loss_fn(m: nn.Module, x, y):
            xt, yt = with_trigger_batch(x, y, trigger)
            loss = cross_entropy(m(x), y) + cfg.c2 * cross_entropy(m(xt), y)
            for scheme in schemes:
                loss = loss + cfg.c1 * (
                    cross_entropy(fake_quant_forward(m, x, scheme), y)
                    + cfg.c2 * cross_entropy(fake_quant_forward(m, xt, scheme), yt)
                )
            return loss

        return self.fit(model, data, loss_fn, progress)
