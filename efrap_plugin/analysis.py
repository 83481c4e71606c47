"""Where a backdoor can hide: per-layer truncation errors of nearest rounding.

EFRAP's finding is that QCBs live in the rounding decisions of weights with large truncation error
(those near a rounding boundary); this table shows how many there are, layer by layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from .rounding import truncation_error
from .schemes import QuantScheme

__all__ = ["LayerScan", "scan_weights", "format_scan"]


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

    def to_dict(self) -> dict:
        return asdict(self)


def scan_weights(weights: Mapping[str, torch.Tensor], scheme: QuantScheme) -> list[LayerScan]:
    """Truncation-error statistics of each weight tensor (output channels on axis 0) on ``scheme``."""
    rows = []
    for name, w in weights.items():
        w = w.detach().to(torch.float32)
        scale, zp = scheme.qparams(w)
        s = scale.reshape([-1] + [1] * (w.dim() - 1)) if scale.numel() > 1 else scale.reshape([1] * w.dim())
        err = truncation_error(w, scheme, scale, zp) / s
        frac = w / s - torch.floor(w / s)
        neuron = err.reshape(err.shape[0], -1).norm(dim=1)
        rows.append(
            LayerScan(
                name,
                tuple(w.shape),
                scheme.bits,
                float(err.mean()),
                float(((frac - 0.5).abs() < 0.05).float().mean()),
                float(neuron.max()),
                float(neuron.mean()),
            )
        )
    return rows


def format_scan(rows: list[LayerScan]) -> str:
    """A plain-text table for the terminal."""
    header = (
        f"{'layer':<32} {'shape':<18} {'bits':>4} {'mean|e| (LSB)':>14} {'near 0.5':>9} {'max ||e_i||':>12}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name[:32]:<32} {'x'.join(map(str, r.shape)):<18} {r.bits:>4} {r.mean_error_lsb:>14.4f} "
            f"{100 * r.near_boundary:>8.1f}% {r.max_neuron_error:>12.3f}"
        )
    return "\n".join(lines)
