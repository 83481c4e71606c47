"""Learned flipped rounding of one layer: the numerical core of EFRAP, backend-neutral.

A pure function of its inputs: (weight, grid, cached inputs and float targets, config, generator)
-> integers. Adapters capture the activations their own way and call ``learn_rounding``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import EFRAPConfig
from .errors import EFRAPError
from .schemes import QuantScheme

__all__ = ["LayerProblem", "LayerResult", "learn_rounding", "learnable_bounds", "truncation_error"]

log = logging.getLogger(__name__)

_GAMMA, _ZETA = -0.1, 1.1


@dataclass
class LayerProblem:
    """One layer's rounding problem.

    ``forward(x, w)`` computes the layer's output from inputs and a weight (the activation-preservation
    unit); ``inputs`` come from the partially quantized model, ``targets`` from the float model.
    """

    name: str
    weight: torch.Tensor
    scheme: QuantScheme
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    inputs: torch.Tensor
    targets: torch.Tensor
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None

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
        if self.scale is None or self.zero_point is None:
            self.scale, self.zero_point = self.scheme.qparams(self.weight)


@dataclass(frozen=True)
class LayerResult:
    integers: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    flipped_share: float
    loss_before: float
    loss_after: float
    act_error_nearest: float
    act_error_learned: float


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if t.numel() == 1:
        return t.reshape([1] * like.dim()).to(torch.float32)
    return t.reshape([-1] + [1] * (like.dim() - 1)).to(torch.float32)


def truncation_error(
    weight: torch.Tensor, scheme: QuantScheme, scale: torch.Tensor, zero_point: torch.Tensor
):
    """|w - Q_nearest(w)| in weight units, clamping included."""
    return (weight - scheme.dequantize(scheme.quantize(weight, scale, zero_point), scale, zero_point)).abs()


def learnable_bounds(
    weight: torch.Tensor, scheme: QuantScheme, scale: torch.Tensor, zero_point: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-element integer bounds of the learned rounding, and the mask of elements kept at nearest.

    For absmax grids the backend recomputes the scale from max|w|: the element(s) holding each
    channel's max stay at nearest, and no other integer may reach past that max, so that weights
    snapped to the plan's grid give the backend the very same scale.
    """
    s, z = _expand(scale, weight), _expand(zero_point, weight)
    lo = torch.full_like(weight, float(scheme.qmin))
    hi = torch.full_like(weight, float(scheme.qmax))
    if scheme.range_rule != "absmax":
        return lo, hi, torch.zeros_like(weight, dtype=torch.bool)
    limit = torch.floor(scheme.absmax(weight) / s + 1e-4)
    lo = torch.maximum(lo, -limit + z)
    hi = torch.minimum(hi, limit + z)
    return lo, hi, scheme.scale_setters(weight)


def _rectify(v: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "sigmoid":
        return torch.sigmoid(v)
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)


def _init_logits(frac: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "sigmoid":
        f = frac.clamp(1e-4, 1 - 1e-4)
        return torch.log(f / (1 - f))
    f = ((frac - _GAMMA) / (_ZETA - _GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(f / (1 - f))


def _act_error(problem: LayerProblem, w: torch.Tensor, chunk: int = 256) -> float:
    total, energy = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, problem.inputs.shape[0], chunk):
            y = problem.forward(problem.inputs[i : i + chunk], w)
            t = problem.targets[i : i + chunk]
            total += float((y - t).pow(2).sum())
            energy += float(t.pow(2).sum())
    return total / max(energy, 1e-12)


def _flip_cost(problem: LayerProblem, s: torch.Tensor, generator: torch.Generator | None) -> float:
    """L_A of moving every weight by one integer step in a random direction: what 'flip everything' costs.

    Dividing L_A by it makes the trade-off against L_F (in integer units) the same at every bit width,
    layer size and input scale.
    """
    x = problem.inputs[: min(problem.inputs.shape[0], 256)]
    with torch.no_grad():
        zero = problem.forward(x, torch.zeros_like(problem.weight))
        costs = []
        for _ in range(2):
            signs = torch.randint(0, 2, problem.weight.shape, generator=generator).to(torch.float32) * 2 - 1
            diff = (problem.forward(x, signs * s) - zero).pow(2)
            costs.append(float(diff.sum(dim=1).mean() if diff.dim() > 1 else diff.mean()))
    return sum(costs) / len(costs)


def _flip_errors(err: torch.Tensor, config: EFRAPConfig) -> torch.Tensor:
    """L_F's per-weight factor: the truncation error itself, or its output channel's error norm."""
    if config.error_norm != "neuron":
        return err
    per_channel = err.reshape(err.shape[0], -1)
    norm = per_channel.norm(dim=1)
    if config.balance == "lsb":  # RMS, not L2: the same scale as element errors at every fan-in
        norm = norm / per_channel.shape[1] ** 0.5
    return norm.reshape([-1] + [1] * (err.dim() - 1)).expand_as(err)


def learn_rounding(
    problem: LayerProblem,
    config: EFRAPConfig,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> LayerResult:
    """Optimise L_A + L_F + L_P (or an ablation) for one layer, then hard-round.

    Returns the layer's integers on ``problem.scheme``'s grid. Deterministic for a given generator.

    References: Li et al., "Nearest is Not Dearest", CVPR 2024 (arXiv 2405.12725); Nagel et al.,
    "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020 (arXiv 2004.10568).
    """
    scheme, w = problem.scheme, problem.weight.detach().to(torch.float32)
    scale, zp = problem.scale, problem.zero_point
    s, z = _expand(scale, w), _expand(zp, w)
    base = torch.floor(w / s)
    frac = w / s - base
    lo, hi, frozen = learnable_bounds(w, scheme, scale, zp)
    nearest = scheme.quantize(w, scale, zp).to(torch.float32)
    up_nearest = (frac > 0.5).to(torch.float32)  # frac exactly 0.5 counts as down
    target = 1.0 - up_nearest
    err = truncation_error(w, scheme, scale, zp)
    err = _flip_errors(err, config)
    if config.balance == "lsb":
        err = err / s
        flip_scale = 1.0 / w.numel()
        act_scale = 1.0 / max(_flip_cost(problem, s, generator), 1e-20)
    else:
        flip_scale, act_scale = 1.0, 1.0
    learnable = ~frozen

    v = _init_logits(frac, config.rectifier).clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=config.lr)
    use_act = config.objective != "flip_only"
    use_flip = config.objective != "preserve_only"
    n = problem.inputs.shape[0]

    def soft_weight(h: torch.Tensor) -> torch.Tensor:
        h = torch.where(learnable, h, nearest - z - base)
        q = torch.minimum(torch.maximum(base + h + z, lo), hi)
        return (q - z) * s

    def losses(idx: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = _rectify(v, config.rectifier)
        zero = h.new_zeros(())
        l_a = zero
        if use_act:
            y = problem.forward(problem.inputs[idx], soft_weight(h))
            diff = (y - problem.targets[idx]).pow(2)
            l_a = (diff.sum(dim=1).mean() if diff.dim() > 1 else diff.mean()) * act_scale
        l_f = zero
        if use_flip:
            bce = -(target * torch.log(h + 1e-8) + (1 - target) * torch.log(1 - h + 1e-8))
            l_f = config.flip_weight * flip_scale * (err * bce * learnable).sum()
        l_p = (
            config.round_weight
            * (1 - (2 * h - 1).abs().pow(beta))[learnable].sum()
            * (flip_scale if config.balance == "lsb" else 1.0)
        )
        return l_a, l_f, l_p

    probe = torch.arange(min(n, 256))
    with torch.no_grad():
        before = float(sum(losses(probe, config.beta)))
    warm = int(0.2 * config.iters)
    for it in range(config.iters):
        if config.anneal_beta:
            t = max(0.0, (it - warm) / max(config.iters - warm, 1))
            beta = 2 + 0.5 * (20 - 2) * (1 + math.cos(t * math.pi))
        else:
            beta = config.beta
        idx = torch.randint(0, n, (min(config.batch_size, n),), generator=generator)
        l_a, l_f, l_p = losses(idx, beta)
        loss = l_a + l_f + (l_p if (not config.anneal_beta or it >= warm) else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(1)
    with torch.no_grad():
        after = float(sum(losses(probe, config.beta)))
        up = (v >= 0).to(torch.float32)
        q = torch.where(learnable, torch.minimum(torch.maximum(base + up + z, lo), hi), nearest)
        integers = q.to(torch.int32)
        flipped = float(((integers.to(torch.float32) != nearest) & learnable).float().sum() / w.numel())
        err_near = _act_error(problem, scheme.dequantize(nearest, scale, zp))
        err_learn = _act_error(problem, scheme.dequantize(integers, scale, zp))
    log.debug("%s: flipped %.1f%%, loss %.4g -> %.4g", problem.name, 100 * flipped, before, after)
    return LayerResult(integers, scale, zp, flipped, before, after, err_near, err_learn)
