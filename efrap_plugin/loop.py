"""The one per-layer loop every backend runs: learn a layer's rounding, install it, go on to the next.

An adapter is a producer: it yields one ``LayerProblem`` per quantized weight, in execution order,
building each only when asked, so that a layer's inputs are captured after every earlier layer's
learned integers were installed (``LayerProblem.install``) in the partially quantized model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from .config import EFRAPConfig
from .layers import fingerprint
from .plan import LayerPlan
from .rounding import LayerProblem, learn_rounding
from .threads import threads_for
from .training import resolve_device

__all__ = ["defend_layers"]

log = logging.getLogger(__name__)


def step_flops(problem: LayerProblem, config: EFRAPConfig) -> float:
    """A step's forward + backward through the layer, about 3x the forward's multiply-adds x 2."""
    per_sample = problem.targets[0].numel() * problem.weight[0].numel()
    return 6.0 * min(config.batch_size, problem.inputs.shape[0]) * per_sample


def defend_layers(
    problems: Iterable[LayerProblem], config: EFRAPConfig, layers: int, progress: bool = True
) -> dict[str, LayerPlan]:
    """Learn and install the rounding of each problem in turn; the plan of every layer, by problem name.

    ``layers`` (the number of problems) sizes the progress bar. One generator seeded with
    ``config.seed`` drives every layer's batch sampling, so the same problems give the same plan.
    """
    resolve_device(config.device)  # before the first layer's inputs are captured
    generator = torch.Generator().manual_seed(config.seed)
    plans: dict[str, LayerPlan] = {}
    with tqdm(total=config.iters * layers, desc="EFRAP", unit="it", disable=not progress, leave=False) as bar:
        for problem in problems:
            bar.set_postfix(layer=problem.name)
            with threads_for(step_flops(problem, config), config.device):
                result = learn_rounding(problem, config, generator, bar.update)
            if problem.install is not None:
                problem.install(result.integers)
            plans[problem.name] = LayerPlan(
                problem.name,
                result.integers,
                result.scale,
                result.zero_point,
                problem.scheme.quantize(problem.weight, result.scale, result.zero_point),
                fingerprint(problem.weight),
                {
                    "flipped_share": result.flipped_share,
                    "loss_before": result.loss_before,
                    "loss_after": result.loss_after,
                    "act_error_nearest": result.act_error_nearest,
                    "act_error_learned": result.act_error_learned,
                    "bits": problem.scheme.bits,
                    "steps": result.steps,
                },
            )
            log.info(
                "%s: %.1f%% flipped, loss %.4g -> %.4g, relative output error %.2e (nearest %.2e)",
                problem.name,
                100 * result.flipped_share,
                result.loss_before,
                result.loss_after,
                result.act_error_learned,
                result.act_error_nearest,
            )
    return plans
