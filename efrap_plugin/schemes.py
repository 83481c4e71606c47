"""Quantization schemes that reproduce each backend's integer grid exactly.

An attack fires, and a defense holds, only on the grid the backend really uses: integer range,
scale formula (down to the float precision it is computed in) and rounding. Presets here are checked
bit for bit against onnxruntime, torchao and Brevitas in the tests.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .errors import EFRAPError

__all__ = [
    "QuantScheme",
    "SCHEME_PRESETS",
    "scheme_preset",
    "ActivationQuantizer",
    "round_ste",
]

_RANGE_SEARCH = ("absmax", "minmax", "mse")
_PRECISIONS = ("float32", "float64")


@dataclass(frozen=True, kw_only=True)
class QuantScheme:
    """How one backend turns float weights (and layer inputs) into integers. Keyword fields: a scheme
    says what each of its numbers is."""

    name: str = "onnxruntime"
    """Preset name, recorded in plans and attack files."""
    bits: int = 8
    """Weight bit width, 2..16 (the presets and the CLI: 2..8)."""
    qmin: int = -127
    """Smallest weight integer."""
    qmax: int = 127
    """Largest weight integer."""
    per_channel: bool = True
    """One scale per output channel (axis 0) instead of one per tensor."""
    range_rule: Literal["absmax", "minmax", "mse"] = "absmax"
    """absmax: symmetric, scale = max|w| / ((qmax - qmin) / 2), zero point 0 (onnxruntime, torch,
    Brevitas); minmax: affine over [min, max]; mse: affine, range shrunk by the paper's MSE search."""
    scale_precision: Literal["float32", "float64"] = "float32"
    """Float precision the backend computes the scale in before storing it as float32."""
    inverse_scale: bool = False
    """Round w * (1 / scale), as torch's quantize_per_channel kernels do, instead of w / scale."""
    folds_batchnorm: bool = True
    """Whether the backend folds BatchNorm into the preceding Conv before quantizing."""
    act_bits: int = 8
    """Activation bit width (per-tensor affine, unsigned, calibrated)."""
    act_range_rule: Literal["minmax", "mse"] = "minmax"
    """minmax over the calibration set (onnxruntime, torch observers) or the paper's MSE search + EMA."""
    edge_bits: int | None = None
    """Bit width for the first and last layers (the paper keeps them at 8); None: same as ``bits``."""
    power_of_two_scale: bool = False
    """absmax scale rounded up to a power of two (Brevitas' fixed-point quantizers)."""
    group_size: int | None = None
    """Per-group grids (torchao's PerGroup, Brevitas' per-group quantizers): one scale / zero point per
    ``group_size`` consecutive weights of each output channel's flattened inputs, stored [C, groups].
    None: per channel or per tensor."""
    scale_floor: float | None = None
    """Smallest absmax scale a float32-precision backend stores (an all-zero channel's): None, float32's
    eps (torch observers, torchao's int8 tensors); torchao's intx configs floor at float32's smallest
    normal number."""
    learns_conv_transpose: bool = False
    """Whether the torch path learns a ConvTranspose on this grid: onnxruntime quantizes one per channel
    along its output channels (axis 1), and the paper's fake quantization rounds every layer; torchao's
    X86Inductor leaves it in float, and the project's Brevitas route has no such layer."""

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise EFRAPError(f"QuantScheme.bits: expected an integer in 2..16, got {self.bits!r}")
        if not self.qmin < 0 <= self.qmax and self.range_rule == "absmax":
            raise EFRAPError(
                f"QuantScheme: an absmax scheme needs qmin < 0 <= qmax, got [{self.qmin}, {self.qmax}]"
            )
        if self.qmax - self.qmin + 1 > 2**self.bits:
            raise EFRAPError(
                f"QuantScheme: [{self.qmin}, {self.qmax}] has more than 2**{self.bits} integers; "
                "widen bits or narrow the range"
            )
        if self.range_rule not in _RANGE_SEARCH:
            raise EFRAPError(
                f"QuantScheme.range_rule: expected one of {_RANGE_SEARCH}, got {self.range_rule!r}"
            )
        if self.scale_precision not in _PRECISIONS:
            raise EFRAPError(
                f"QuantScheme.scale_precision: expected one of {_PRECISIONS}, got {self.scale_precision!r}"
            )
        if self.power_of_two_scale and self.range_rule != "absmax":
            raise EFRAPError("QuantScheme.power_of_two_scale: needs range_rule='absmax'")
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or self.group_size < 1 or not self.per_channel
        ):
            raise EFRAPError(
                f"QuantScheme.group_size: expected a positive integer on a per-channel grid, got "
                f"{self.group_size!r} (per_channel={self.per_channel})"
            )
        if not 2 <= self.act_bits <= 16:
            raise EFRAPError(f"QuantScheme.act_bits: expected 2..16, got {self.act_bits!r}")

    # ----- presets -------------------------------------------------------------------------------
    @classmethod
    def onnxruntime(cls, bits: int = 8, per_channel: bool = True) -> QuantScheme:
        """quantize_static QDQ: int8 symmetric RESTRICTED [-127, 127]; int4 full [-8, 7]."""
        _check_bits(bits)
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax if bits == 8 else -(2 ** (bits - 1))
        return cls(
            name="onnxruntime",
            bits=bits,
            qmin=qmin,
            qmax=qmax,
            per_channel=per_channel,
            range_rule="absmax",
            scale_precision="float64",
            learns_conv_transpose=True,
        )

    @classmethod
    def torchao_x86(cls, bits: int = 8, per_channel: bool = True) -> QuantScheme:
        """X86InductorQuantizer / torch observers: full [-2^(b-1), 2^(b-1)-1], scale max|w|/((qmax-qmin)/2)."""
        _check_bits(bits)
        return cls(
            name="torchao-x86",
            bits=bits,
            qmin=-(2 ** (bits - 1)),
            qmax=2 ** (bits - 1) - 1,
            per_channel=per_channel,
            range_rule="absmax",
            scale_precision="float32",
            inverse_scale=True,
        )

    @classmethod
    def brevitas(cls, bits: int = 8, per_channel: bool = True) -> QuantScheme:
        """Brevitas Int8Weight*Float: narrow range [-(2^(b-1)-1), 2^(b-1)-1], scale max|w|/qmax."""
        _check_bits(bits)
        qmax = 2 ** (bits - 1) - 1
        return cls(
            name="brevitas-int8",
            bits=bits,
            qmin=-qmax,
            qmax=qmax,
            per_channel=per_channel,
            range_rule="absmax",
            scale_precision="float32",
        )

    @classmethod
    def reference(cls, bits: int = 4) -> QuantScheme:
        """The paper's setting: affine per-channel [0, 2^b-1], MSE-searched range, 8-bit edge layers."""
        _check_bits(bits)
        return cls(
            name="reference",
            bits=bits,
            qmin=0,
            qmax=2**bits - 1,
            per_channel=True,
            range_rule="mse",
            scale_precision="float32",
            inverse_scale=False,
            folds_batchnorm=False,
            act_bits=8,
            act_range_rule="mse",
            edge_bits=8,
            learns_conv_transpose=True,
        )

    # ----- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantScheme:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise EFRAPError(
                f"QuantScheme: unknown fields {sorted(unknown)}; expected a subset of {sorted(known)}"
            )
        if "learns_conv_transpose" not in data:  # written before the field: the presets that learned them
            data = {**data, "learns_conv_transpose": data.get("name") in ("onnxruntime", "reference")}
        return cls(**data)

    def for_layer(self, position: str) -> QuantScheme:
        """The scheme of a first or last layer, where ``edge_bits`` applies."""
        if self.edge_bits is None or position == "middle" or self.edge_bits == self.bits:
            return self
        bits = self.edge_bits
        if self.qmin >= 0:  # affine: [0, 2^b - 1]
            return dataclasses.replace(self, bits=bits, qmin=0, qmax=2**bits - 1)
        qmax = 2 ** (bits - 1) - 1  # symmetric: the same narrow or full range at the edge's bit width
        return dataclasses.replace(
            self, bits=bits, qmin=-qmax if self.qmin == -self.qmax else -qmax - 1, qmax=qmax
        )

    # ----- the grid ------------------------------------------------------------------------------
    def qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point exactly as the backend computes them; shape [C] or [1]."""
        w = weight.detach().to(torch.float32)
        scale, zero_point = self._row_qparams(self._rows(w))
        return (scale, zero_point) if self.group_size is None else self._grouped(w, scale, zero_point)

    def _row_qparams(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One scale / zero point per row of ``flat`` (a channel, a group, or the tensor)."""
        if self.range_rule == "absmax":
            absmax = torch.maximum(
                flat.max(dim=1).values.clamp(min=0), (-flat.min(dim=1).values).clamp(min=0)
            )
            half_range = (self.qmax - self.qmin) / 2
            if self.scale_precision == "float64":
                scale = (absmax.to(torch.float64) / half_range).to(torch.float32)
            else:
                scale = absmax / half_range
            if self.scale_precision == "float64":  # onnxruntime: a degenerate range gets scale 1.0
                scale = torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale)
            else:  # torch observers: scale floored at float32 eps
                floor = self.scale_floor if self.scale_floor is not None else torch.finfo(torch.float32).eps
                scale = torch.clamp(scale, min=floor)
            if self.power_of_two_scale:
                scale = torch.exp2(torch.ceil(torch.log2(scale)))
            return scale, torch.zeros_like(scale, dtype=torch.int32)
        lo = flat.min(dim=1).values.clamp(max=0)
        hi = flat.max(dim=1).values.clamp(min=0)
        if self.range_rule == "mse":
            lo, hi = _mse_range(flat, lo, hi, self.qmin, self.qmax, steps=80)
        return _affine_qparams(lo, hi, self.qmin, self.qmax)

    def _rows(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` as one row per scale: per tensor, per output channel, or per group of each channel."""
        if not self.per_channel:
            return w.reshape(1, -1)
        flat = w.reshape(w.shape[0], -1)
        if self.group_size is None:
            return flat
        if flat.shape[1] % self.group_size:
            raise EFRAPError(
                f"QuantScheme.group_size: {flat.shape[1]} weights per output channel do not split into groups "
                f"of {self.group_size}; choose a group size that divides them"
            )
        return flat.reshape(-1, self.group_size)

    def _grouped(self, w: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-row values of ``_rows`` as [C, groups]."""
        return tuple(r.reshape(w.shape[0], -1) for r in rows)

    def absmax(self, weight: torch.Tensor) -> torch.Tensor:
        """max|w| per scale (output channel, group or tensor), broadcast against ``weight``."""
        w = weight.detach().to(torch.float32).abs()
        peak = self._rows(w).max(dim=1).values
        return broadcast_qparam(w, peak if self.group_size is None else self._grouped(w, peak)[0])

    def scale_setters(self, weight: torch.Tensor) -> torch.Tensor:
        """Mask of the elements an absmax scale is computed from (none for other range rules): moving
        them would move the scale, so learned rounding keeps them at nearest and snapping keeps them exact."""
        if self.range_rule != "absmax":
            return torch.zeros_like(weight, dtype=torch.bool)
        return weight.detach().to(torch.float32).abs() == self.absmax(weight)

    def quantize(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        """Nearest (half-to-even) integers, clamped: what the backend stores."""
        s, z = broadcast_qparam(weight, scale), broadcast_qparam(weight, zero_point)
        w = weight.to(torch.float32)
        q = torch.round(w * (1.0 / s) if self.inverse_scale else w / s) + z
        return q.clamp(self.qmin, self.qmax).to(torch.int32)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        s, z = broadcast_qparam(q, scale), broadcast_qparam(q, zero_point)
        return (q.to(torch.float32) - z) * s

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Nearest rounding with a straight-through gradient (scale treated as a constant)."""
        scale, zp = self.qparams(weight)
        s, z = broadcast_qparam(weight, scale), broadcast_qparam(weight, zp)
        q = (round_ste(weight * (1.0 / s) if self.inverse_scale else weight / s) + z).clamp(
            self.qmin, self.qmax
        )
        return (q - z) * s


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half-to-even forward, identity backward."""
    return x + (torch.round(x) - x).detach()


SCHEME_PRESETS = {
    "onnxruntime": QuantScheme.onnxruntime,
    "torchao-x86": QuantScheme.torchao_x86,
    "brevitas-int8": QuantScheme.brevitas,
    "reference": QuantScheme.reference,
}


def scheme_preset(name: str, bits: int = 8) -> QuantScheme:
    """A preset by name, as the CLI's ``--scheme`` and attack files spell it."""
    if isinstance(name, QuantScheme):
        return name
    try:
        factory = SCHEME_PRESETS[name]
    except KeyError:
        raise EFRAPError(
            f"scheme: expected one of {sorted(SCHEME_PRESETS)} (--scheme), got {name!r}"
        ) from None
    return factory(bits)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise EFRAPError(f"bits: expected an integer in 2..8 (--bits), got {bits!r}")


def broadcast_qparam(like: torch.Tensor, qparam: torch.Tensor) -> torch.Tensor:
    """A scale / zero point (one, one per output channel, or [C, groups]) shaped to broadcast over
    ``like``; groups run along each channel's flattened inputs."""
    if qparam.numel() == 1:
        return qparam.reshape([1] * like.dim()).to(torch.float32)
    if qparam.dim() == 2 and qparam.shape[1] > 1:
        per_row = like[0].numel() // qparam.shape[1]
        return qparam.repeat_interleave(per_row, dim=1).reshape(like.shape).to(torch.float32)
    return qparam.reshape([-1] + [1] * (like.dim() - 1)).to(torch.float32)


def _affine_qparams(
    lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (hi - lo) / float(qmax - qmin)
    scale = torch.where(scale > torch.finfo(torch.float32).eps, scale, torch.ones_like(scale))
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def _mse_range(
    flat: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's search: shrink [min, max] by 1% steps, keep the lowest L2 error per row."""
    best_err = torch.full_like(lo, math.inf)
    best_lo, best_hi = lo.clone(), hi.clone()
    for k in range(steps):
        f = 1.0 - 0.01 * k
        cand_lo, cand_hi = lo * f, hi * f
        scale, zp = _affine_qparams(cand_lo, cand_hi, qmin, qmax)
        s, z = scale[:, None], zp[:, None].to(torch.float32)
        deq = ((torch.round(flat / s) + z).clamp(qmin, qmax) - z) * s
        err = (deq - flat).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, cand_lo, best_lo)
        best_hi = torch.where(better, cand_hi, best_hi)
    return best_lo, best_hi


class ActivationQuantizer:
    """Per-tensor affine activation quantizer, calibrated on batches like the backend's observer."""

    def __init__(self, bits: int = 8, range_rule: str = "minmax", ema: float = 0.9) -> None:
        self.qmin, self.qmax = 0, 2**bits - 1
        self.range_rule = range_rule
        self.ema = ema
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(1, -1).to(torch.float32)
        lo, hi = x.min(dim=1).values.clamp(max=0), x.max(dim=1).values.clamp(min=0)
        if self.range_rule == "mse":
            lo, hi = _mse_range(x, lo, hi, self.qmin, self.qmax, steps=95)
            if self.lo is not None:
                lo = self.ema * self.lo + (1 - self.ema) * lo
                hi = self.ema * self.hi + (1 - self.ema) * hi
        elif self.lo is not None:
            lo, hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        self.lo, self.hi = lo, hi

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None or self.hi is None:
            raise EFRAPError("ActivationQuantizer: observe() calibration batches before quantizing")
        return _affine_qparams(self.lo, self.hi, self.qmin, self.qmax)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = self.qparams()
        s, z = scale.to(x.dtype), zp.to(x.dtype)
        q = (torch.round(x / s) + z).clamp(self.qmin, self.qmax)
        return (q - z) * s
