"""Metrics of a backdoored / defended classifier, for anything that maps a batch to logits.

Column names follow BackdoorBench: clean_acc, asr, ra, der (see shared/spec/evaluation.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..data import LabeledData
from ..errors import EFRAPError
from .triggers import PatchTrigger

__all__ = [
    "Metrics",
    "as_predictor",
    "predict",
    "clean_acc",
    "asr",
    "ra",
    "der",
    "evaluate",
    "outcomes",
    "Outcomes",
    "attack_fires",
    "backdoor_removed",
    "compare",
    "intervals",
    "paired_change",
    "wilson_interval",
    "ATTACK_BARS",
    "REMOVAL_BARS",
]

ATTACK_BARS = {"float_asr_max": 0.10, "float_acc_min": 0.95, "stock_asr_min": 0.90}
"""A QCB attack fires: the float model looks clean, the backend's stock quantized model is backdoored."""
REMOVAL_BARS = {"asr_floor": 0.03, "asr_over_float": 0.01, "acc_drop_max": 0.01}
"""The backdoor is removed: asr <= max(3%, the float model's asr + 1 point), accuracy within 1 point."""

Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Metrics:
    """Shares in [0, 1]."""

    clean_acc: float
    asr: float
    ra: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def as_predictor(model: Any) -> Predictor:
    """A function batch -> logits for a torch module, an onnxruntime session, or a callable."""
    if isinstance(model, torch.nn.Module):

        def run_module(x: torch.Tensor) -> torch.Tensor:
            switch = model.training
            if switch:
                try:
                    model.eval()
                except NotImplementedError:  # exported (PT2E) graphs refuse .eval(); they run as exported
                    switch = False
            try:
                with torch.no_grad():
                    return model(x)
            finally:
                if switch:
                    model.train(True)

        return run_module
    if hasattr(model, "get_inputs") and hasattr(model, "run"):  # onnxruntime.InferenceSession
        name = model.get_inputs()[0].name

        def run_session(x: torch.Tensor) -> torch.Tensor:
            out = model.run(None, {name: np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0]
            return torch.from_numpy(np.asarray(out))

        return run_session
    if callable(model):
        return model
    raise EFRAPError(
        f"model: expected a torch.nn.Module, an onnxruntime.InferenceSession or a callable, got {type(model).__name__}"
    )


def predict(model: Any, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels, computed in batches."""
    fn = as_predictor(model)
    preds = []
    for start in range(0, x.shape[0], batch_size):
        logits = torch.as_tensor(fn(x[start : start + batch_size]))
        if logits.dim() != 2 or logits.shape[0] != min(batch_size, x.shape[0] - start):
            raise EFRAPError(
                f"model output: expected batch x classes logits, got shape {tuple(logits.shape)}"
            )
        preds.append(logits.argmax(dim=1))
    return torch.cat(preds)


def clean_acc(model: Any, data: LabeledData) -> float:
    """Top-1 accuracy on clean images."""
    return float((predict(model, data.x) == data.y).float().mean())


def _triggered(data: LabeledData, trigger: PatchTrigger) -> tuple[torch.Tensor, torch.Tensor]:
    poisoned = trigger.poisoned(data, labels="true")
    if len(poisoned) == 0:
        raise EFRAPError("asr: every test image has the target label; no image can measure the attack")
    return poisoned.x, poisoned.y


def asr(model: Any, data: LabeledData, trigger: PatchTrigger) -> float:
    """Share of triggered non-target images classified as the target."""
    x, _ = _triggered(data, trigger)
    return float((predict(model, x) == trigger.target).float().mean())


def ra(model: Any, data: LabeledData, trigger: PatchTrigger) -> float:
    """Robust accuracy: share of triggered non-target images classified as their true label."""
    x, y = _triggered(data, trigger)
    return float((predict(model, x) == y).float().mean())


@dataclass(frozen=True)
class Outcomes:
    """What ``evaluate`` counts, image by image: the hits behind each metric, which paired comparisons of
    two models on the same images need (``paired_change``)."""

    right: torch.Tensor
    """Per clean image: the top-1 is its label."""
    to_target: torch.Tensor | None
    """Per triggered non-target image (None without a trigger): the top-1 is the attack's target."""
    kept: torch.Tensor | None
    """Per triggered non-target image: the top-1 is still its own label."""

    def metrics(self) -> Metrics:
        def share(hits: torch.Tensor | None) -> float:
            return float("nan") if hits is None else float(hits.float().mean())

        return Metrics(share(self.right), share(self.to_target), share(self.kept))


def outcomes(model: Any, data: LabeledData, trigger: PatchTrigger | None = None) -> Outcomes:
    """Each image's hits, in one pass over the clean and one over the triggered test images."""
    right = predict(model, data.x) == data.y
    if trigger is None:
        return Outcomes(right, None, None)
    x, y = _triggered(data, trigger)
    pred = predict(model, x)
    return Outcomes(right, pred == trigger.target, pred == y)


def evaluate(model: Any, data: LabeledData, trigger: PatchTrigger | None = None) -> Metrics:
    """clean_acc, asr and ra in one pass over the clean and triggered test images."""
    return outcomes(model, data, trigger).metrics()


def der(before: Metrics, after: Metrics) -> float:
    """Defense effectiveness rating: (max(0, dASR) - max(0, dACC) + 1) / 2, before = nearest PTQ."""
    return (max(0.0, before.asr - after.asr) - max(0.0, before.clean_acc - after.clean_acc) + 1.0) / 2.0


def attack_fires(float_m: Metrics, stock: Metrics) -> bool:
    """The project's attack bar (ATTACK_BARS): float asr <= 10%, float accuracy >= 95%, stock asr >= 90%."""
    bars = ATTACK_BARS
    return (
        float_m.asr <= bars["float_asr_max"]
        and float_m.clean_acc >= bars["float_acc_min"]
        and stock.asr >= bars["stock_asr_min"]
    )


def backdoor_removed(float_m: Metrics, defended: Metrics, asr_cap: float | None = None) -> bool:
    """The project's removal bar (REMOVAL_BARS): the defended model keeps no more backdoor than the float
    model (asr <= max(3%, float asr + 1 point)) and loses at most 1 point of accuracy. ``asr_cap``
    replaces the asr bound (3% alone, say: the frontier below the float model's own residual)."""
    bars = REMOVAL_BARS
    bound = asr_cap if asr_cap is not None else max(bars["asr_floor"], float_m.asr + bars["asr_over_float"])
    return defended.asr <= bound and defended.clean_acc >= float_m.clean_acc - bars["acc_drop_max"]


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of the share ``hits / n`` (95% at the default ``z``). On a few hundred test
    images a measured accuracy or asr moves by a point or more with the images drawn (one defended digits
    model's accuracy drop differs by up to 3.3 points between two halves of its test split,
    benchmarks/results/crossfit.md): the interval says how far a figure can be trusted."""
    if n <= 0 or not 0 <= hits <= n:
        raise EFRAPError(f"wilson_interval: expected 0 <= hits <= n and n > 0, got hits={hits}, n={n}")
    share = hits / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * float(np.sqrt(share * (1 - share) / n + z * z / (4 * n * n)))
    return max(0.0, centre - half), min(1.0, centre + half)


def intervals(
    metrics: Metrics, data: LabeledData, trigger: PatchTrigger | None = None, z: float = 1.96
) -> dict[str, tuple[float, float]]:
    """Wilson intervals of ``metrics`` as ``evaluate(model, data, trigger)`` measured them: clean_acc on
    every image of ``data``, asr and ra (with a trigger) on its non-target images."""
    out = {"clean_acc": wilson_interval(round(metrics.clean_acc * len(data)), len(data), z)}
    if trigger is not None:
        triggered = int((data.y != trigger.target).sum())
        for name in ("asr", "ra"):
            out[name] = wilson_interval(round(getattr(metrics, name) * triggered), triggered, z)
    return out


def paired_change(before: torch.Tensor, after: torch.Tensor, z: float = 1.96) -> tuple[float, float, float]:
    """How a share changes between two models on the same items (``after``'s minus ``before``'s, from each
    item's hit as a boolean), with Newcombe's (1998) interval for paired proportions (95% at the default
    ``z``): two models judged on the same test images agree on most of them, so the change is known far
    more tightly than two separate intervals suggest."""
    before, after = torch.as_tensor(before).bool().flatten(), torch.as_tensor(after).bool().flatten()
    if before.shape != after.shape or before.numel() == 0:
        raise EFRAPError(
            f"paired_change: expected one hit per item for both models, got {before.numel()} and {after.numel()}"
        )
    n = before.numel()
    both = int((before & after).sum())
    before_only, after_only = int((before & ~after).sum()), int((~before & after).sum())
    neither = n - both - before_only - after_only
    p1, p2 = (both + before_only) / n, (both + after_only) / n
    l1, u1 = wilson_interval(both + before_only, n, z)
    l2, u2 = wilson_interval(both + after_only, n, z)
    margins = (both + before_only) * (after_only + neither) * (both + after_only) * (before_only + neither)
    cross = both * neither - before_only * after_only
    cross = cross - n / 2 if cross > n / 2 else min(cross, 0)  # Newcombe's correction of the correlation
    phi = cross / float(np.sqrt(margins)) if margins else 0.0
    below = float(np.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2)))
    above = float(np.sqrt(max(0.0, (u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2)))
    change = p2 - p1
    return change, max(-1.0, change - below), min(1.0, change + above)


def compare(data: LabeledData, trigger: PatchTrigger, **models: Any) -> dict[str, float]:
    """``<name>_acc`` and ``<name>_asr`` in percent (2 decimals) for each model given by name, in order:
    the row the examples and benchmarks print (float / stock / efrap)."""
    row: dict[str, float] = {}
    for name, model in models.items():
        m = evaluate(model, data, trigger)
        row[f"{name}_acc"], row[f"{name}_asr"] = round(100 * m.clean_acc, 2), round(100 * m.asr, 2)
    return row
