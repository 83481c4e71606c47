"""EFRAPConfig: every knob of the defense, frozen, validated, JSON round-trippable."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from .errors import EFRAPError

__all__ = ["BUDGET_ONLY", "HOLDOUT_CHOICES", "LAYER_INPUTS", "UNITS", "EFRAPConfig", "LayerInputs", "Unit"]

_OBJECTIVES = ("efrap", "flip_only", "preserve_only")
HOLDOUT_CHOICES = ("boundary", "last")
"""EFRAPConfig.holdout_choice's values."""
LayerInputs = Literal["quantized", "float", "mixed"]
LAYER_INPUTS: tuple[str, ...] = ("quantized", "float", "mixed")
"""EFRAPConfig.layer_inputs's values (None: the producer's own)."""
Unit = Literal["activation", "layer"]
UNITS: tuple[str, ...] = ("activation", "layer")
"""EFRAPConfig.unit's values (None: the producer's own)."""
_DEFAULT_MAX_STRENGTH = 0.5
_DEFAULT_FLIP_WEIGHT = 1.0
_DEFAULT_HOLDOUT = 256

BUDGET_ONLY: dict[str, tuple[str, str]] = {
    "max_strength": ("--max-strength", "tops budget mode's ladder"),
    "margin_cap": ("--margin-cap", "caps budget mode's ladder"),
    "holdout": ("--holdout", "sets the images budget mode measures on"),
    "holdout_choice": ("--holdout-choice", "picks the images budget mode measures on"),
}
"""The fields that mean something only under a budget: their flag and what they do. Given without a
budget they are refused (by the config where they differ from the default, by the CLI where given)."""


@dataclass(frozen=True)
class EFRAPConfig:
    """Hyperparameters of error-guided flipped rounding with activation preservation."""

    iters: int = 1000
    """Adam iterations per layer (--iters). The reference uses 10,000."""
    batch_size: int = 32
    """Cached calibration images per iteration (--batch-size)."""
    lr: float = 1e-2
    """Adam learning rate on the rounding logits V (--lr). The reference uses 1e-3."""
    calib_size: int = 1024
    """Calibration images used (--calib-size)."""
    flip_weight: float = _DEFAULT_FLIP_WEIGHT
    """Weight of L_F, the error-guided flipping term (--flip-weight), the one fixed strength of every
    layer when ``budget`` is None. Budget mode has no L_F term: it flips by force, searching the share
    per layer."""
    round_weight: float = 0.01
    """Weight of L_P, the binarisation penalty."""
    beta: float = 2.0
    """Exponent of L_P when not annealed (reference: 2)."""
    anneal_beta: bool = False
    """AdaRound's beta schedule 20 -> 2 after a 20% warm-up, instead of the fixed beta."""
    rectifier: Literal["sigmoid", "stretched"] = "sigmoid"
    """h(V): plain sigmoid (reference code) or AdaRound's stretched sigmoid clipped to [0, 1]."""
    error_norm: Literal["element", "neuron"] = "element"
    """L_F weights: element-wise truncation error (reference code) or the paper's per-channel error norm
    (L2 under balance="reference"; under "lsb" its RMS, so that flip_weight keeps its meaning at any fan-in)."""
    balance: Literal["reference", "lsb"] = "lsb"
    """reference: L_F in weight units, summed (the paper's code); lsb: L_F in integer units (|e|/s)
    averaged per weight, and L_A divided by the L_A of moving every weight one integer step, so that
    the same flip_weight means the same trade-off at every bit width, layer size and input scale."""
    unit: Unit | None = None
    """What L_A preserves (--unit): "activation", the layer's output after its ReLU when one follows
    (the reference's unit, errors on negative pre-activations cost nothing), or "layer", the raw layer
    output. None: the producer's own (activation; layer in Brevitas, whose ReLU is a quantized module of
    its own). A producer that cannot honour the choice refuses it with the reason."""
    layer_inputs: LayerInputs | None = None
    """Where a layer's cached inputs come from: "quantized" (the partially quantized
    model, the reference), "float" (the float model) or "mixed" (each element from one or the other at
    random). None: the producer's own (mixed in the torchao and Brevitas flows, quantized in ``defend``
    and onnxruntime; benchmarks/results/layer-inputs.md). A producer that cannot honour the choice
    refuses it with the reason."""
    objective: Literal["efrap", "flip_only", "preserve_only"] = "efrap"
    """efrap: L_A + L_F + L_P; ablations: flip_only (L_F + L_P), preserve_only (L_A + L_P, AdaRound-like)."""
    seed: int = 1005
    """Seed of the batch sampling (--seed); same seed, same plan."""
    device: str = "cpu"
    """Where each layer's optimisation runs (--device): "cpu", "cuda", "cuda:1", ... Cached inputs and
    targets move there one layer at a time; the plan comes back on the CPU."""
    patience: int = 0
    """Early stop (--patience): end a layer's optimisation once its hard-rounded integers have held
    still for this many steps (looked at every 50; ``settle``); 0 runs all ``iters``. Off by default: at
    1,000 steps a layer's output error is still falling, so stopping sooner moves the outcome
    (benchmarks/results/early-stop.md, steps.md)."""
    settle: float = 0.0
    """Early stop (--settle): the share of a layer's learnable integers that may still change per 50
    steps while it counts as holding still; 0 asks for no change at all."""
    budget: float | None = None
    """Budget mode (--budget PCT): the top-1 disagreement with the float model, in percent of
    held-out calibration images, that flipping may add to what quantization itself costs. Each layer
    searches its flipping strength from weak to strong and keeps the strongest whose disagreement exceeds
    that of its weakest by at most its share of the budget, and whose margin risk stays within
    ``margin_cap`` (benchmarks/results/margin.md). None (the default, --budget off): one fixed strength,
    ``flip_weight``, for every layer (the paper's). Not the default: with budget 0.5, top 0.8 and cap 4
    three user-flow examples missed the removal bar (make test-slow)."""
    max_strength: float = _DEFAULT_MAX_STRENGTH
    """Budget mode (--max-strength): the top of each layer's ladder, the largest share of its learnable
    weights flipped by force (the ladder climbs 0, 0.1, 0.2, ... to it). Without a margin cap, tops above
    0.5 lower the asr and can cost clean accuracy the held-out disagreement does not see
    (benchmarks/results/ladder.md); with a margin cap of 4, 0.8 met the strict bar on every firing digits
    cell (margin.md)."""
    margin_cap: float | None = None
    """Budget mode (--margin-cap PCT): the largest share of held-out calibration images, in percent, whose
    float class's margin (its output over the best other class) may be halved or lost; a layer's ladder
    also stops at the first strength over it. Disagreement counts decisions that flipped; this sees
    confidence falling first, so a strong ladder can climb without clean accuracy sliding
    (benchmarks/results/margin.md). None (the default): no cap."""
    holdout: int = _DEFAULT_HOLDOUT
    """Budget mode (--holdout): calibration images held out of the optimisation to measure the
    disagreement on (at most a quarter of the calibration data when less than ``calib_size`` + this is
    supplied). Each weighs 100 / holdout percent: on 256, a one-point accuracy change is 2.6 images
    expected with a standard deviation of 1.6, too few to see, so hold out more where data is to spare."""
    holdout_choice: str = "boundary"
    """Budget mode (--holdout-choice): which calibration inputs are held out. "boundary" (the default):
    those nearest the float model's decision boundaries (the smallest margins of its class over the best
    other), where a rounding that costs clean accuracy flips decisions first; most training images a
    defender calibrates with sit far from them and show little of that cost (benchmarks/results/
    boundary.md: on the users' flows, a largest drop of 0.92 points at budget 1 against 2.04, and more asr
    left). "last": the last ``holdout`` inputs, as supplied."""

    def __post_init__(self) -> None:
        _positive(self, "iters", "--iters")
        _positive(self, "batch_size", "--batch-size")
        _positive(self, "calib_size", "--calib-size")
        if not isinstance(self.device, str) or not self.device:
            raise EFRAPError(
                f"EFRAPConfig.device (--device): expected a device name such as 'cpu' or 'cuda', got {self.device!r}"
            )
        if not isinstance(self.patience, int) or self.patience < 0:
            raise EFRAPError(f"EFRAPConfig.patience (--patience): expected steps >= 0, got {self.patience!r}")
        if not isinstance(self.settle, (int, float)) or not 0 <= self.settle < 1:
            raise EFRAPError(
                f"EFRAPConfig.settle (--settle): expected a share in [0, 1), got {self.settle!r}"
            )
        if self.objective not in _OBJECTIVES:
            raise EFRAPError(f"EFRAPConfig.objective: expected one of {_OBJECTIVES}, got {self.objective!r}")
        self._check_budget_mode()
        _positive(self, "holdout", "--holdout")
        if self.holdout_choice not in HOLDOUT_CHOICES:
            raise EFRAPError(
                f"EFRAPConfig.holdout_choice (--holdout-choice): expected one of {HOLDOUT_CHOICES}, "
                f"got {self.holdout_choice!r}"
            )
        if not _finite(self.lr) or not self.lr > 0:
            raise EFRAPError(
                f"EFRAPConfig.lr (--lr): expected a finite positive learning rate, got {self.lr!r}"
            )
        for name in ("flip_weight", "round_weight", "beta"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:  # NaN compares false with everything: test finiteness first
                raise EFRAPError(f"EFRAPConfig.{name}: expected a finite value >= 0, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise EFRAPError(f"EFRAPConfig.seed (--seed): expected an integer, got {self.seed!r}")
        if self.rectifier not in ("sigmoid", "stretched"):
            raise EFRAPError(
                f"EFRAPConfig.rectifier: expected 'sigmoid' or 'stretched', got {self.rectifier!r}"
            )
        if self.error_norm not in ("element", "neuron"):
            raise EFRAPError(
                f"EFRAPConfig.error_norm: expected 'element' or 'neuron', got {self.error_norm!r}"
            )
        if self.unit is not None and self.unit not in UNITS:
            raise EFRAPError(f"EFRAPConfig.unit (--unit): expected one of {UNITS} or None, got {self.unit!r}")
        if self.layer_inputs is not None and self.layer_inputs not in LAYER_INPUTS:
            raise EFRAPError(
                f"EFRAPConfig.layer_inputs: expected 'quantized', 'float' or 'mixed', got {self.layer_inputs!r} "
                "(None: the route's own)"
            )
        if self.balance not in ("reference", "lsb"):
            raise EFRAPError(f"EFRAPConfig.balance: expected 'reference' or 'lsb', got {self.balance!r}")

    def _check_budget_mode(self) -> None:
        """Budget mode's fields: in range, and given only with a budget (they mean nothing without one)."""
        if self.budget is not None and not (
            isinstance(self.budget, (int, float)) and 0 <= self.budget <= 100
        ):
            raise EFRAPError(
                f"EFRAPConfig.budget (--budget): expected a percentage in [0, 100] or None, got {self.budget!r}"
            )
        if self.budget is not None and self.objective != "efrap":
            raise EFRAPError(
                f"EFRAPConfig.budget (--budget): budget mode searches the flipping strength of "
                f"the full objective; objective={self.objective!r} has none to search. Set budget=None "
                "(--budget off)"
            )
        if self.budget is not None and self.flip_weight != _DEFAULT_FLIP_WEIGHT:
            raise EFRAPError(
                f"EFRAPConfig.flip_weight (--flip-weight): the one fixed flipping strength, and budget mode "
                f"(budget={self.budget!r}) searches the strength per layer instead; set budget=None "
                "(--budget off) to use it"
            )
        if isinstance(self.max_strength, bool) or not (
            isinstance(self.max_strength, (int, float)) and 0 < self.max_strength <= 1
        ):
            raise EFRAPError(
                f"EFRAPConfig.max_strength (--max-strength): expected a share in (0, 1], got {self.max_strength!r}"
            )
        if self.margin_cap is not None and (
            isinstance(self.margin_cap, bool)
            or not (isinstance(self.margin_cap, (int, float)) and 0 <= self.margin_cap <= 100)
        ):
            raise EFRAPError(
                f"EFRAPConfig.margin_cap (--margin-cap): expected a percentage in [0, 100] or None, "
                f"got {self.margin_cap!r}"
            )
        if self.budget is None:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name in BUDGET_ONLY:
                if getattr(self, name) != defaults[name]:
                    raise EFRAPError(_budget_only(name, field=True))

    @classmethod
    def from_flags(cls, given: dict[str, Any], base: EFRAPConfig | None = None) -> EFRAPConfig:
        """``base`` (the defaults) with the fields a command line gave: a budget-mode field given without
        a budget, or the fixed strength given with one, is refused even where its value is the default's
        (it would mean nothing)."""
        base = base or cls()
        if given.get("budget", base.budget) is None:
            for name in BUDGET_ONLY:
                if name in given and not (name == "margin_cap" and given[name] is None):
                    raise EFRAPError(_budget_only(name, field=False))
        elif "flip_weight" in given:
            raise EFRAPError(
                "--flip-weight sets the one fixed flipping strength; --budget searches the strength per layer "
                "instead. Give one of them (--budget off to use --flip-weight)"
            )
        return dataclasses.replace(base, **given)

    @classmethod
    def reference(cls, **changes: Any) -> EFRAPConfig:
        """The paper's code: 10,000 Adam steps of lr 1e-3 per layer, batch 32, 1,024 images, seed 1005."""
        base = cls(iters=10_000, batch_size=32, lr=1e-3, calib_size=1024, balance="reference", budget=None)
        return dataclasses.replace(base, **changes)

    def replace(self, **changes: Any) -> EFRAPConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EFRAPConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if set(data) - known:
            raise EFRAPError(f"EFRAPConfig: unknown fields {sorted(set(data) - known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> EFRAPConfig:
        """Some fields as a JSON object (the rest default), as a script's flag takes them: '{"budget": 1}'."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EFRAPError(f"EFRAPConfig: expected a JSON object of fields, got {text!r} ({exc})") from None
        if not isinstance(data, dict):
            raise EFRAPError(f"EFRAPConfig: expected a JSON object of fields, got {text!r}")
        return cls.from_dict(data)


def _budget_only(name: str, field: bool) -> str:
    flag, does = BUDGET_ONLY[name]
    what = f"EFRAPConfig.{name} ({flag})" if field else flag
    return f"{what} {does}, and budget is None (--budget off); give --budget PCT with it"


def _finite(value: Any) -> bool:
    """A real number (not a bool, not NaN, not infinite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(cfg: EFRAPConfig, name: str, flag: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or value <= 0:
        raise EFRAPError(f"EFRAPConfig.{name} ({flag}): expected a positive integer, got {value!r}")
