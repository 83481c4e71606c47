"""PQBackdoor (Ma et al., IEEE TDSC 2023): plant an ordinary backdoor, then fine-tune it out of the
float model while every weight is projected back so that it keeps its stage-1 integer on each
protected grid, and each channel's range (hence the scale) does not move."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.functional import cross_entropy

from ...data import LabeledData
from ...errors import EFRAPError
from ...layers import QUANTIZABLE
from ...schemes import QuantScheme, broadcast_qparam
from ..training import train
from ..triggers import PatchTrigger
from .base import Attack

__all__ = ["PQBackdoor", "PQBackdoorConfig", "GridProjection"]


@dataclass(frozen=True)
class PQBackdoorConfig:
    poison_epochs: int = 7
    """Stage 1: data-poisoning epochs; longer entrenches a backdoor stage 2 cannot remove from the float
    model (benchmarks/results/sweep-digits-pq8-stage1.md)."""
    poison_per_batch: int = 4
    """Stage 1: triggered images relabelled to the target in each batch (reference: 2 per 128)."""
    poison_lr: float = 1e-3
    """Stage 1: Adam learning rate."""
    repair_epochs: int = 150
    """Stage 2: constrained fine-tuning epochs."""
    repair_lr: float = 1e-3
    """Stage 2: Adam learning rate."""
    batch_size: int = 128
    """Images per step (stage 2 adds as many triggered copies with their true labels)."""
    margin: float = 0.02
    """Stage 2 keeps weights this far (in integer units) inside their rounding bin."""
    repair_trigger_weight: float = 1.0
    """Stage 2: weight of the triggered images' loss (true labels) against the clean images' loss."""
    seed: int = 0
    """Seed of the batch order."""
    widen: float = 1.0
    """Between the stages: each Linear row gets an outlier of ``widen`` x its max on an input that is zero
    on every training image, clean and triggered (a pixel never inked, a ReLU unit that never fires), so
    an absmax grid's scale, and each rounding bin stage 2 may move in, grows ``widen`` times at no cost to
    the float model. 1: off. Narrow int8 bins on Linear models leave stage 2 too little room otherwise
    (benchmarks/results/quantize.md)."""


class GridProjection:
    """Keeps every Conv/Linear weight on its stage-1 integers and range, on every protected grid."""

    def __init__(self, model: nn.Module, schemes: list[QuantScheme], margin: float = 0.02) -> None:
        for s in schemes:
            if s.range_rule != "absmax":
                raise EFRAPError(
                    f"PQBackdoor: scheme {s.name!r} uses range_rule={s.range_rule!r}; the projection protects "
                    "absmax (symmetric) grids, the ones onnxruntime, torchao and Brevitas use"
                )
        self.layers = [m for m in model.modules() if isinstance(m, QUANTIZABLE)]
        self.schemes = schemes
        self.bounds = []
        for layer in self.layers:
            w0 = layer.weight.detach().clone()
            lo = torch.full_like(w0, -torch.inf)
            hi = torch.full_like(w0, torch.inf)
            grids = []
            for scheme in schemes:
                scale, zp = scheme.qparams(w0)
                q0 = scheme.quantize(w0, scale, zp)
                s = broadcast_qparam(w0, scale)
                low = torch.where(q0 == scheme.qmin, -torch.inf, (q0 - 0.5 + margin) * s)
                high = torch.where(q0 == scheme.qmax, torch.inf, (q0 + 0.5 - margin) * s)
                lo, hi = torch.maximum(lo, low), torch.minimum(hi, high)
                grids.append((scheme, scale, zp, q0))
            flat = w0.abs().reshape(w0.shape[0], -1)
            ch_max = flat.max(dim=1).values.reshape([-1] + [1] * (w0.dim() - 1))
            t_max = w0.abs().max()
            pinned = (w0.abs() == ch_max) | (w0.abs() == t_max)
            lo, hi = torch.maximum(lo, -ch_max), torch.minimum(hi, ch_max)
            for scheme in schemes:
                if scheme.group_size is not None:  # each group's max sets its scale
                    pinned = pinned | scheme.scale_setters(w0)
                    lo, hi = torch.maximum(lo, -scheme.absmax(w0)), torch.minimum(hi, scheme.absmax(w0))
            pinned = pinned | (lo > hi)  # bins of several grids whose margins leave no room: stay at w0
            self.bounds.append((w0, lo, hi, pinned, grids))

    @torch.no_grad()
    def __call__(self) -> None:
        for layer, (w0, lo, hi, pinned, _) in zip(self.layers, self.bounds):
            w = torch.minimum(torch.maximum(layer.weight, lo), hi)
            layer.weight.copy_(torch.where(pinned, w0, w))

    @torch.no_grad()
    def violations(self) -> int:
        """How many weights no longer round to their stage-1 integer on some protected grid."""
        bad = 0
        for layer, (_, _, _, _, grids) in zip(self.layers, self.bounds):
            for scheme, _, _, q0 in grids:
                scale, zp = scheme.qparams(layer.weight)
                bad += int((scheme.quantize(layer.weight, scale, zp) != q0).sum())
        return bad


class PQBackdoor(Attack):
    name = "pqbackdoor"
    config_class = PQBackdoorConfig

    def run(
        self,
        model: nn.Module,
        data: LabeledData,
        trigger: PatchTrigger,
        schemes: list[QuantScheme],
        progress: bool,
    ) -> nn.Module:
        cfg = self.config
        k = cfg.poison_per_batch

        def poison_loss(m: nn.Module, x, y):
            x, y = x.clone(), y.clone()
            x[:k] = trigger.apply(x[:k])
            y[:k] = trigger.target
            return cross_entropy(m(x), y)

        train(
            model,
            data,
            cfg.poison_epochs,
            cfg.poison_lr,
            cfg.batch_size,
            0.0,
            "adam",
            poison_loss,
            seed=cfg.seed,
            progress=progress,
            desc=f"{self.name} stage 1",
        )

        if cfg.widen != 1.0:
            _widen_rows(model, data, trigger, cfg.widen)
        # Stage 2: BatchNorm and biases stay at their stage-1 values; only Conv/Linear weights move.
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("weight") and isinstance(_owner(model, name), QUANTIZABLE))
        project = GridProjection(model, schemes, cfg.margin)

        def repair_loss(m: nn.Module, x, y):
            logits = m(torch.cat([x, trigger.apply(x)]))
            n = x.shape[0]
            return cross_entropy(logits[:n], y) + cfg.repair_trigger_weight * cross_entropy(logits[n:], y)

        train(
            model,
            data,
            cfg.repair_epochs,
            cfg.repair_lr,
            cfg.batch_size,
            0.0,
            "adam",
            repair_loss,
            after_step=project,
            seed=cfg.seed + 1,
            progress=progress,
            desc=f"{self.name} stage 2",
            freeze_batchnorm=True,
        )
        for p in model.parameters():
            p.requires_grad_(True)
        return model


@torch.no_grad()
def _widen_rows(model: nn.Module, data: LabeledData, trigger: PatchTrigger, factor: float) -> None:
    """Put an outlier of ``factor`` x each row's max on one input of each Linear layer that is zero on
    every training image, clean and triggered; a layer with no such input is left as it is."""
    peaks: dict[nn.Module, torch.Tensor] = {}

    def keep(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(dim=0)
        peaks[layer] = torch.maximum(peaks[layer], x) if layer in peaks else x

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    hooks = [m.register_forward_pre_hook(keep) for m in linears]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(data.x), 256):
            batch = data.x[i : i + 256]
            model(batch)
            model(trigger.apply(batch))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    for layer in linears:
        dead = (peaks[layer] == 0).nonzero().flatten()
        if len(dead):
            rows = layer.weight.abs().amax(dim=1)
            layer.weight[:, int(dead[0])] = factor * rows


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    return model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model
