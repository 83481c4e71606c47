"""Learned flipped rounding of one layer: the numerical core of EFRAP, backend-neutral.

A pure function of its inputs: (weight, grid, cached inputs and float targets, config, generator)
-> integers. Adapters capture the activations their own way and call ``learn_rounding``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .config import EFRAPConfig
from .device import resolve_device
from .objective import PROBE_ROWS, Objective, beta_schedule, init_logits
from .producer import LayerProblem

__all__ = [
    "BUDGET_STRENGTHS",
    "LayerProblem",
    "LayerResult",
    "budget_strengths",
    "learn_rounding",
    "path_steps",
    "rounding_path",
]

log = logging.getLogger(__name__)

_ENERGY_FLOOR = 1e-12
PATIENCE_CHECK = 50  # steps between two looks at the hard-rounded integers (EFRAPConfig.patience)


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
    steps: int
    strength: float | None = None
    """Budget mode: the share of learnable weights flipped by force (``budget_strengths``); None otherwise."""


STAGE_SHARE = 4
"""Budget mode: each strength runs ``iters // STAGE_SHARE`` steps from the previous one's logits, so the
default ladder costs 1.5x one fixed-strength run, and each rung above it a quarter more."""


def _ladder(top: float) -> tuple[float, ...]:
    """0, 0.1, 0.2, ... below ``top``, then ``top`` (i / 10: the literals 0.1, 0.2, ... exactly)."""
    return (*(i / 10 for i in range(10) if i / 10 < top), float(top))


BUDGET_STRENGTHS = _ladder(EFRAPConfig.max_strength)
"""Budget mode's default ladder, weak to strong: the share of a layer's learnable weights whose rounding
is flipped, largest truncation error first (benchmarks/results/budget.md)."""


def budget_strengths(config: EFRAPConfig) -> tuple[float, ...]:
    """Budget mode's ladder up to ``config.max_strength``: 0, 0.1, 0.2, ..., and the top itself where it
    falls between two rungs. BUDGET_STRENGTHS at the default top."""
    return _ladder(config.max_strength)


def path_steps(config: EFRAPConfig) -> int:
    """Optimizer steps one layer's ``rounding_path`` takes at most."""
    if config.budget is None:
        return config.iters
    return len(budget_strengths(config)) * max(config.iters // STAGE_SHARE, 1)


def learn_rounding(
    problem: LayerProblem,
    config: EFRAPConfig,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> LayerResult:
    """Optimise L_A + L_F + L_P (or an ablation) for one layer, then hard-round.

    Returns the layer's integers on ``problem.scheme``'s grid. Deterministic for a given generator.
    Under a budget, the strongest rounding of the ladder, unmeasured (``defend_layers`` measures).

    References: Li et al., "Nearest is Not Dearest", CVPR 2024 (arXiv 2405.12725); Nagel et al.,
    "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020 (arXiv 2004.10568).
    """
    *_, last = rounding_path(problem, config, generator, progress)
    return last


def rounding_path(
    problem: LayerProblem,
    config: EFRAPConfig,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[LayerResult]:
    """One layer's learned roundings, weak to strong: one at ``flip_weight``, or under a budget one per
    strength of its ladder (``budget_strengths``), each continuing from the previous one's logits
    (``result.strength``).

    A caller that stops early (the budget is spent) skips the stronger strengths' steps.
    """
    device = resolve_device(config.device)
    if device.type != "cpu":
        problem = _on(problem, device)
    objective = Objective.build(problem, config, generator)
    v = init_logits(objective.frac, config.rectifier).clone()
    opt = FusedAdam(v, config.lr)
    with torch.no_grad():
        before = objective.probe_loss(v, config.beta)
    stages = (
        [(None, config.iters)]
        if config.budget is None
        else [(share, max(config.iters // STAGE_SHARE, 1)) for share in budget_strengths(config)]
    )
    steps = 0  # taken so far on this layer
    for strength, stage_steps in stages:
        if strength is not None:
            objective.force_flips(strength)
        steps += _optimise(objective, v, opt, stage_steps, generator, progress)
        with torch.no_grad():
            after = objective.probe_loss(v, config.beta)
            integers = objective.hard_round(v)
        result = _result(problem, objective, integers, before, after, steps, strength)
        if device.type != "cpu":
            result = dataclasses.replace(
                result,
                integers=result.integers.cpu(),
                scale=result.scale.cpu(),
                zero_point=result.zero_point.cpu(),
            )
        yield result


class FusedAdam:
    """``torch.optim.Adam([v], lr, fused=True)``'s update (the same kernel, the same numbers) without the
    optimizer's per-step bookkeeping: on a small layer that bookkeeping cost about a fifth of a step."""

    BETAS, EPS = (0.9, 0.999), 1e-8

    def __init__(self, v: torch.Tensor, lr: float) -> None:
        self.v, self.lr = v, lr
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(v), torch.zeros_like(v)
        self.steps = torch.zeros((), dtype=torch.float32, device=v.device)  # Adam's state["step"]

    def step(self, grad: torch.Tensor) -> None:
        self.steps += 1
        torch._fused_adam_(
            [self.v],
            [grad],
            [self.exp_avg],
            [self.exp_avg_sq],
            [],
            [self.steps],
            amsgrad=False,
            lr=self.lr,
            beta1=self.BETAS[0],
            beta2=self.BETAS[1],
            weight_decay=0.0,
            eps=self.EPS,
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )


def _optimise(
    objective: Objective,
    v: torch.Tensor,
    opt: FusedAdam,
    steps: int,
    generator: torch.Generator | None,
    progress: Callable[[int], None] | None,
) -> int:
    """Adam on V for ``steps`` steps, or until the hard-rounded integers hold still (``patience``,
    ``settle``); the steps taken."""
    config, problem = objective.config, objective.problem
    n = problem.inputs.shape[0]
    stable, last = 0, None
    allowed = config.settle * int(objective.free.sum())  # changes per look that still count as still
    grad = torch.empty_like(v)  # one buffer for every step's gradient (Objective.gradient)
    for it in range(steps):
        beta, with_penalty = beta_schedule(it, config, steps)
        idx = torch.randint(0, n, (min(config.batch_size, n),), generator=generator)
        if idx.device != v.device:
            idx = idx.to(v.device)
        opt.step(objective.gradient(v, idx, beta, with_penalty, out=grad))
        if progress is not None:
            progress(1)
        if config.patience and with_penalty and (it + 1) % PATIENCE_CHECK == 0:
            with torch.no_grad():
                now = objective.hard_round(v)
            still = last is not None and int((now != last).sum()) <= allowed
            stable = stable + PATIENCE_CHECK if still else 0
            last = now
            if stable >= config.patience:
                if progress is not None:
                    progress(steps - it - 1)
                return it + 1
    return steps


def _on(problem: LayerProblem, device: torch.device) -> LayerProblem:
    """The problem's tensors on ``device`` (forward functions move what they captured: on_device_of)."""
    return dataclasses.replace(
        problem,
        weight=problem.weight.to(device),
        inputs=problem.inputs.to(device),
        targets=problem.targets.to(device),
        scale=problem.scale.to(device),
        zero_point=problem.zero_point.to(device),
        install=None,
    )


def _result(
    problem: LayerProblem,
    objective: Objective,
    integers: torch.Tensor,
    before: float,
    after: float,
    steps: int,
    strength: float | None = None,
) -> LayerResult:
    scheme, scale, zp = problem.scheme, problem.scale, problem.zero_point
    nearest, learnable = objective.nearest, objective.learnable
    flipped = float(((integers.to(torch.float32) != nearest) & learnable).float().sum() / nearest.numel())
    with torch.no_grad():
        err_near = _act_error(problem, scheme.dequantize(nearest, scale, zp))
        err_learn = _act_error(problem, scheme.dequantize(integers, scale, zp))
    log.debug("%s: flipped %.1f%%, loss %.4g -> %.4g", problem.name, 100 * flipped, before, after)
    return LayerResult(integers, scale, zp, flipped, before, after, err_near, err_learn, steps, strength)


def _act_error(problem: LayerProblem, w: torch.Tensor) -> float:
    """||unit(X; w) - Y_fp||^2 / ||Y_fp||^2 over every cached input, in chunks."""
    total, energy = 0.0, 0.0
    for i in range(0, problem.inputs.shape[0], PROBE_ROWS):
        y = problem.forward(problem.inputs[i : i + PROBE_ROWS], w)
        t = problem.targets[i : i + PROBE_ROWS]
        total += float(torch.nn.functional.mse_loss(y, t, reduction="sum"))  # fused: no chunk-sized copies
        energy += float(t.pow(2).sum())
    return total / max(energy, _ENERGY_FLOOR)
