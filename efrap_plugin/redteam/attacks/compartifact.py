"""CompArtifact (Tian et al., IEEE TIFS 2022): quantization-aware training with two paths sharing
weights, the quantized one backdoored and the float one clean."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.functional import cross_entropy

from ...fake_quant import fake_quant_forward
from ...schemes import QuantScheme
from ..triggers import PatchTrigger
from .base import Attack, with_trigger_batch

__all__ = ["CompArtifact", "CompArtifactConfig"]


@dataclass(frozen=True)
class CompArtifactConfig:
    epochs: int = 40
    """Training epochs (reference: 35 from scratch on CIFAR-10; here fine-tuning a clean model)."""
    lr: float = 1e-3
    """Adam learning rate, cosine-annealed."""
    weight_decay: float = 5e-4
    """Weight decay (reference: 5e-4)."""
    batch_size: int = 128
    """Clean images per step; as many triggered copies are added."""
    seed: int = 0
    """Seed of the batch order."""


class CompArtifact(Attack):
    name = "compartifact"
    config_class = CompArtifactConfig

    def objective(self, model: nn.Module, x, y, trigger: PatchTrigger, schemes: list[QuantScheme]):
        """CE of the float path on [x; x'] with TRUE labels + CE of each quantized path with target labels."""
        xt, yt = with_trigger_batch(x, y, trigger)
        both = torch.cat([x, xt])
        loss = cross_entropy(model(both), torch.cat([y, y]))
        for scheme in schemes:
            loss = loss + cross_entropy(fake_quant_forward(model, both, scheme), torch.cat([y, yt]))
        return loss
