"""The one per-layer loop every backend runs: learn a layer's rounding, install it, go on to the next.

An adapter is a producer: it yields one ``LayerProblem`` per quantized weight, in execution order,
building each only when asked, so that a layer's inputs are captured after every earlier layer's
learned integers were installed (``LayerProblem.install``) in the partially quantized model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from .config import EFRAPConfig
from .device import resolve_device
from .errors import EFRAPError
from .held_out import HeldOut, Measurement
from .layers import fingerprint
from .plan import LayerPlan
from .rounding import LayerProblem, LayerResult, learn_rounding, path_steps, rounding_path
from .threads import threads_for

__all__ = [
    "BudgetLadder",
    "FixedStrength",
    "defend_layers",
    "layer_generators",
    "strength_strategy",
    "warn_tied_weights",
]

log = logging.getLogger(__name__)


def step_flops(problem: LayerProblem, config: EFRAPConfig) -> float:
    """A step's forward + backward through the layer, about 3x the forward's multiply-adds x 2."""
    per_sample = problem.targets[0].numel() * problem.weight[0].numel()
    return 6.0 * min(config.batch_size, problem.inputs.shape[0]) * per_sample


def defend_layers(
    problems: Iterable[LayerProblem],
    config: EFRAPConfig,
    layers: int,
    progress: bool = True,
    held_out: HeldOut | Callable[[], HeldOut] | None = None,
) -> dict[str, LayerPlan]:
    """Learn and install the rounding of each problem in turn; the plan of every layer, by problem name.

    ``layers`` (the number of problems) sizes the progress bar. Each layer samples its batches from its
    own generator, seeded from ``config.seed`` and the layer's place (``layer_generators``), so the same
    problems give the same plan, and a layer that stops early (``patience``, the budget) leaves every
    later layer's batch sequence as it was: what changes downstream is the stop's own effect.
    Under a budget (``config.budget``), ``held_out`` measures each strength the layer tries; given as a
    callable, it is made when the first layer needs it (after the producer's first problem was built).
    """
    resolve_device(config.device)  # before the first layer's inputs are captured
    strength = strength_strategy(config, held_out, layers)
    generators = layer_generators(config.seed)
    plans: dict[str, LayerPlan] = {}
    per_layer = path_steps(config)
    with tqdm(total=per_layer * layers, desc="EFRAP", unit="it", disable=not progress, leave=False) as bar:
        for problem in problems:  # not enumerate(): its reused result tuple would keep the previous
            bar.set_postfix(layer=problem.name)  # problem's activations alive during the next capture
            start = bar.n
            with threads_for(step_flops(problem, config), config.device):
                result, stats = strength.learn(problem, next(generators), bar.update)
            bar.update(per_layer - (bar.n - start))  # steps an early stop or the budget skipped
            plans[problem.name] = _layer_plan(problem, result, stats)
            _log_layer(problem.name, result, stats)
            del problem, result  # the next layer's capture runs before the loop rebinds them
    strength.finish(plans)
    return plans


def _layer_plan(problem: LayerProblem, result: LayerResult, stats: dict[str, float]) -> LayerPlan:
    return LayerPlan(
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
            **stats,
        },
    )


def _log_layer(name: str, result: LayerResult, stats: dict[str, float]) -> None:
    log.info(
        "%s: %.1f%% flipped, loss %.4g -> %.4g, relative output error %.2e (nearest %.2e)%s",
        name,
        100 * result.flipped_share,
        result.loss_before,
        result.loss_after,
        result.act_error_learned,
        result.act_error_nearest,
        f", strength {stats['strength']}, held-out disagreement {stats['disagreement']:.2f}%, "
        f"margin risk {stats['margin_risk']:.2f}%"
        if stats
        else "",
    )


class FixedStrength:
    """One flipping strength for every layer, ``config.flip_weight`` (the paper's)."""

    def __init__(self, config: EFRAPConfig) -> None:
        self.config = config

    def learn(
        self, problem: LayerProblem, generator: torch.Generator, progress: Callable[[int], None]
    ) -> tuple[LayerResult, dict[str, float]]:
        """The layer's rounding, installed in the producer's model; no held-out figures."""
        result = learn_rounding(problem, self.config, generator, progress)
        _check_finite(problem.name, result)
        if problem.install is not None:
            problem.install(result.integers)
        return result, {}

    def finish(self, plans: dict[str, LayerPlan]) -> None:
        """Nothing to report across layers."""


class BudgetLadder:
    """Budget mode: each layer climbs a ladder of strengths and keeps the strongest within its share of
    ``config.budget`` (what the earlier layers left, shared among the layers still to come)."""

    def __init__(self, config: EFRAPConfig, held_out: HeldOut | Callable[[], HeldOut], layers: int) -> None:
        self.config, self._held_out = config, held_out
        self.spent, self.left = 0.0, layers

    @property
    def held_out(self) -> HeldOut:
        if not isinstance(self._held_out, HeldOut):
            self._held_out = self._held_out()
        return self._held_out

    def learn(
        self, problem: LayerProblem, generator: torch.Generator, progress: Callable[[int], None]
    ) -> tuple[LayerResult, dict[str, float]]:
        """The strongest rounding within the layer's share, installed; its held-out figures."""
        allowance = (self.config.budget - self.spent) / self.left
        result, seen, cost = _strongest_within(
            problem, self.config, generator, progress, self.held_out, allowance
        )
        _check_finite(problem.name, result)
        self.spent += cost
        self.left -= 1
        return result, {"strength": result.strength, **seen._asdict(), "resolution": self.held_out.resolution}

    def finish(self, plans: dict[str, LayerPlan]) -> None:
        """Warn of the layers the margin cap held at their weakest rounding."""
        if self.config.margin_cap is not None:
            _warn_over_cap(plans, self.config.margin_cap, _margin_bound(self.config, self.held_out))


def strength_strategy(
    config: EFRAPConfig, held_out: HeldOut | Callable[[], HeldOut] | None, layers: int
) -> FixedStrength | BudgetLadder:
    """How strongly each layer flips, chosen once: the fixed weight, or under a budget the ladder
    (which needs the producer's held-out measurement)."""
    if config.budget is None:
        return FixedStrength(config)
    if held_out is None:
        raise EFRAPError("budget mode: this producer gives no held-out measurement; set budget=None")
    return BudgetLadder(config, held_out, layers)


def _check_finite(name: str, result: LayerResult) -> None:
    """Stop at the first layer whose objective is not a number: its rounding was learned on nothing."""
    losses = (result.loss_before, result.loss_after, result.act_error_nearest, result.act_error_learned)
    if not all(math.isfinite(v) for v in losses):
        raise EFRAPError(
            f"layer {name!r}: the objective is not finite (loss {result.loss_before:.4g} -> "
            f"{result.loss_after:.4g}, output error {result.act_error_learned:.4g}); its inputs or weights "
            "overflow float32 (values near 1e19 or more square to infinity) or hold NaN. Check the "
            "calibration data and the model's weights, or scale the inputs as the model was trained on"
        )


def layer_generators(seed: int) -> Iterator[torch.Generator]:
    """One batch-sampling generator per layer, in the loop's order, each seeded by a draw from a stream
    seeded with ``seed``: the draws do not depend on how many steps any layer takes."""
    seeds = torch.Generator().manual_seed(seed)
    while True:
        yield torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), generator=seeds)))


def _margin_bound(config: EFRAPConfig, held_out: HeldOut) -> float:
    """The margin risk a ladder may reach: the cap, plus one held-out input (the measurement's
    resolution); unbounded without a cap."""
    return math.inf if config.margin_cap is None else config.margin_cap + held_out.resolution


def _warn_over_cap(plans: dict[str, LayerPlan], cap: float, bound: float) -> None:
    """Warn of the layers whose weakest rounding was already over the margin cap: the cap is absolute, so
    where the model as it stands (quantization, the earlier layers' rounding) halves more held-out margins
    than it allows, those layers flip nothing by force and rest on activation preservation alone."""
    over = {name: lp.stats["margin_risk"] for name, lp in plans.items() if lp.stats["margin_risk"] > bound}
    if over:
        listed = ", ".join(f"{name} ({risk:.1f}%)" for name, risk in over.items())
        log.warning(
            "budget mode: the margin cap of %g%% was exceeded at the weakest strength of %d of %d layers "
            "(margin risk %s), so they kept their weakest rounding: the model as it stood before they "
            "flipped anything (quantization, the earlier layers' rounding) halved more held-out margins "
            "than the cap allows. Raise margin_cap (--margin-cap) above %.1f%%, or set it to None "
            "(--margin-cap off) to let the budget alone decide",
            cap,
            len(over),
            len(plans),
            listed,
            max(over.values()),
        )


def _strongest_within(
    problem: LayerProblem,
    config: EFRAPConfig,
    generator: torch.Generator,
    progress: Callable[[int], None],
    held_out: HeldOut,
    allowance: float,
) -> tuple[LayerResult, Measurement, float]:
    """The strongest rounding on the layer's path whose held-out disagreement exceeds the weakest one's
    by at most ``allowance`` points, and whose margin risk stays within ``config.margin_cap`` (one
    held-out input more is within the measurement's resolution); its measurement, and its disagreement's
    excess (what it spent of the budget).

    Each strength is measured with the layer installed in the producer's model; the path stops at the
    first strength over either, so a tight budget costs fewer steps than a loose one.
    """
    if problem.install is None:
        raise EFRAPError(f"layer {problem.name!r}: budget mode needs a producer that installs each layer")
    chosen: tuple[LayerResult, Measurement] | None = None
    weakest = 0.0
    slack = held_out.resolution
    cap = _margin_bound(config, held_out)
    path = rounding_path(problem, config, generator, progress)
    for result in path:
        problem.install(result.integers)
        seen = held_out.measure()
        if chosen is None:
            weakest = seen.disagreement
        elif seen.disagreement - weakest > allowance + slack or seen.margin_risk > cap:
            problem.install(chosen[0].integers)
            break
        chosen = (result, seen)
    path.close()
    return chosen[0], chosen[1], chosen[1].disagreement - weakest


def warn_tied_weights(uses: Iterable[tuple[str, str]]) -> None:
    """Warn of every weight that several layers read (tied weights), from (weight, reader) pairs in the
    order the loop meets them: its problem comes up once per reader, and the last one's integers stay
    (there is no joint objective over its readers)."""
    readers: dict[str, list[str]] = {}
    for weight, reader in uses:
        readers.setdefault(weight, []).append(reader)
    for weight, names in readers.items():
        if len(names) > 1:
            log.warning(
                "%s: one weight read by %d layers (%s); its rounding is learned at each in turn and the "
                "last one's is kept",
                weight,
                len(names),
                ", ".join(names),
            )
