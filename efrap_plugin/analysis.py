"""Where a backdoor can hide: per-layer truncation errors of nearest rounding.

EFRAP's finding is that QCBs live in the rounding decisions of weights with large truncation error
(those near a rounding boundary); this table shows how many there are, layer by layer.

It is also a detector. In a model trained without regard to the grid the truncation errors e (in
integer steps) are spread evenly over [0, 0.5]: about 10% of weights lie within 0.05 steps of a
boundary. An interval-constrained repair (PQBackdoor's stage 2) pushes weights toward the edges of their
bins: measured on digits, 99% of them within 0.05 steps at 8 bits, 29% at 4 bits, against 10-11% for
Qu-ANTI-zation and CompArtifact models and a third-party pretrained CIFAR-10 CNN. The test is a one-sided
Kolmogorov-Smirnov test of e against the even spread, in the direction "fewer small errors than chance",
so weights held at any distance from the edge (a wider margin) show as well as weights at the edge.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from .errors import ModelError
from .objective import truncation_error
from .schemes import QuantScheme, broadcast_qparam

__all__ = ["LayerScan", "scan_weights", "format_scan", "crowded_layers"]

_BAND = 0.05
"""Half-width, in integer steps, of the band around a rounding boundary that near_boundary counts."""
_MIN_KS, _MIN_GAP = 3.0, 0.05
"""A layer is flagged when sqrt(n) * D >= 3 (p about 1.5e-8 for evenly spread errors) and D >= 0.05 (so
that a trivial deviation in a layer of millions of weights is not flagged), D being the largest gap by
which the even spread's CDF exceeds the layer's. The elements an absmax scale is computed from are left
out: the rule fixes their error (0.5 steps under onnxruntime's max/7.5 at 4 bits)."""


@dataclass(frozen=True)
class LayerScan:
    name: str
    shape: tuple[int, ...]
    bits: int
    mean_error_lsb: float
    """Mean |w - Q(w)| in integer units (0.25 for uniformly spread weights)."""
    near_boundary: float
    """Share of weights within 0.05 integer steps of a rounding boundary (|frac - 0.5| < 0.05)."""
    max_neuron_error: float
    """Largest per-output-channel L2 norm of the truncation error, in integer units."""
    mean_neuron_error: float
    """Mean per-output-channel L2 norm of the truncation error, in integer units."""
    boundary_ks: float = 0.0
    """sqrt(n) * D, the one-sided Kolmogorov-Smirnov statistic of the errors against an even spread."""
    crowded: bool = False
    """Errors sit toward the boundaries beyond chance (boundary_ks >= 3 and D >= 0.05)."""

    def to_dict(self) -> dict:
        return asdict(self)


def scan_weights(weights: Mapping[str, torch.Tensor], scheme: QuantScheme) -> list[LayerScan]:
    """Truncation-error statistics of each weight tensor (output channels on axis 0) on ``scheme``."""
    rows = []
    for name, w in weights.items():
        if w.numel() == 0:
            raise ModelError(
                f"weight {name!r}: shape {tuple(w.shape)} has no elements, so there is nothing to quantize; "
                "fix the layer's shape or remove it"
            )
        w = w.detach().to(torch.float32)
        if not bool(torch.isfinite(w).all()):
            raise ModelError(
                f"weight {name!r}: holds NaN or Inf values (a BatchNorm with a NaN or negative running_var "
                "folds into them); fix or retrain the model before scanning it"
            )
        scale, zp = scheme.qparams(w)
        s = broadcast_qparam(w, scale)
        err = truncation_error(w, scheme, scale, zp) / s
        frac = w / s - torch.floor(w / s)
        near = (frac - 0.5).abs() < _BAND
        gap, ks = _boundary_ks(err[~scheme.scale_setters(w)])
        neuron = err.reshape(err.shape[0], -1).norm(dim=1)
        rows.append(
            LayerScan(
                name,
                tuple(w.shape),
                scheme.bits,
                float(err.mean()),
                float(near.float().mean()),
                float(neuron.max()),
                float(neuron.mean()),
                ks,
                ks >= _MIN_KS and gap >= _MIN_GAP,
            )
        )
    return rows


def _boundary_ks(err: torch.Tensor) -> tuple[float, float]:
    """D = max over e of (CDF of the even spread on [0, 0.5] - the errors' CDF), and sqrt(n) * D."""
    e = err.flatten().to(torch.float64).clamp(0, 0.5).sort().values
    n = e.numel()
    if n == 0:
        return 0.0, 0.0
    below = torch.arange(n, dtype=torch.float64) / n  # the empirical CDF just before each sorted error
    gap = float((2 * e - below).max().clamp(min=0))
    return gap, gap * math.sqrt(n)


def crowded_layers(rows: list[LayerScan]) -> list[str]:
    """Names of the layers whose weights crowd the rounding boundaries (see the module docstring)."""
    return [r.name for r in rows if r.crowded]


def format_scan(rows: list[LayerScan]) -> str:
    """A plain-text table for the terminal."""
    header = (
        f"{'layer':<32} {'shape':<18} {'bits':>4} {'mean|e| (LSB)':>14} {'near 0.5':>9} {'KS':>7} "
        f"{'max ||e_i||':>12}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name[:32]:<32} {'x'.join(map(str, r.shape)):<18} {r.bits:>4} {r.mean_error_lsb:>14.4f} "
            f"{100 * r.near_boundary:>8.1f}% {r.boundary_ks:>7.1f} {r.max_neuron_error:>12.3f}"
            + ("  crowded" if r.crowded else "")
        )
    crowded = crowded_layers(rows)
    if crowded:
        lines += [
            "",
            f"{len(crowded)} of {len(rows)} layers have weights crowding the rounding boundaries of this grid "
            f"({', '.join(crowded)}): the signature of a PQBackdoor-style repair. Nearest rounding may "
            "switch on a hidden backdoor; quantize with `efrap defend`.",
        ]
    return "\n".join(lines)
