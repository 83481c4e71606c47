"""EFRAP's per-layer objective: the learnable grid, the three loss terms and the beta schedule.

L = L_A (activation preservation) + L_F (error-guided flipping) + L_P (binarisation penalty), as in
the reference code; see ../shared/spec/efrap.md. ``learn_rounding`` (rounding.py) drives it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .config import EFRAPConfig
from .schemes import QuantScheme, broadcast_qparam

if TYPE_CHECKING:
    from .producer import LayerProblem

__all__ = [
    "PROBE_ROWS",
    "PROBE_SIZE",
    "Objective",
    "beta_schedule",
    "expand",
    "init_logits",
    "learnable_bounds",
    "truncation_error",
]

GAMMA, ZETA = -0.1, 1.1
"""AdaRound's stretched sigmoid: sigmoid(V) * (ZETA - GAMMA) + GAMMA, clipped to [0, 1]."""
PROBE_SIZE = 256
"""Cached inputs used to report the loss before / after and to estimate the flip cost."""
PROBE_ROWS = 64
"""Inputs evaluated at once outside the optimizer's steps (flip cost, loss and output error reports)."""
FLIP_COST_SAMPLES = 2
"""Random sign patterns averaged to estimate the L_A of moving every weight one step."""
BETA_START, BETA_END, BETA_WARMUP = 20.0, 2.0, 0.2
"""AdaRound's annealed beta: L_P off for the first 20% of steps, then beta 20 -> 2 (cosine)."""
BCE_EPS = 1e-8
"""Inside the logs of L_F's binary cross-entropy (reference code)."""
LOGIT_CLAMP = 1e-4
"""frac is clamped to [LOGIT_CLAMP, 1 - LOGIT_CLAMP] before the logit, so V starts finite."""
BOUND_TOLERANCE = 1e-4
"""Slack (in integer steps) when flooring max|w| / s, so float error never costs the abs-max integer."""
_COST_FLOOR = 1e-20


def expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scale / zero point (per tensor, channel or group) shaped to broadcast over ``like``."""
    return broadcast_qparam(like, t)


def truncation_error(
    weight: torch.Tensor, scheme: QuantScheme, scale: torch.Tensor, zero_point: torch.Tensor
) -> torch.Tensor:
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
    s, z = expand(scale, weight), expand(zero_point, weight)
    lo = torch.full_like(weight, float(scheme.qmin))
    hi = torch.full_like(weight, float(scheme.qmax))
    if scheme.range_rule != "absmax":
        return lo, hi, torch.zeros_like(weight, dtype=torch.bool)
    limit = torch.floor(scheme.absmax(weight) / s + BOUND_TOLERANCE)
    lo = torch.maximum(lo, -limit + z)
    hi = torch.minimum(hi, limit + z)
    return lo, hi, scheme.scale_setters(weight)


def rectify(v: torch.Tensor, kind: str) -> torch.Tensor:
    """h(V): the soft rounding decision in [0, 1]."""
    return _rectify_parts(v, kind)[0]


def _rectify_parts(
    v: torch.Tensor, kind: str, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(h(V), sigmoid(V), the stretched sigmoid before its clip or None): what h's derivative needs.
    ``out`` receives sigmoid(V)."""
    sig = torch.sigmoid(v, out=out)
    if kind == "sigmoid":
        return sig, sig, None
    stretched = sig * (ZETA - GAMMA) + GAMMA
    return torch.clamp(stretched, 0, 1), sig, stretched


def init_logits(frac: torch.Tensor, kind: str) -> torch.Tensor:
    """V such that h(V) = frac(W / s): the soft weight starts at the float weight (AdaRound's init)."""
    f = frac if kind == "sigmoid" else (frac - GAMMA) / (ZETA - GAMMA)
    f = f.clamp(LOGIT_CLAMP, 1 - LOGIT_CLAMP)
    return torch.log(f / (1 - f))


def beta_schedule(it: int, config: EFRAPConfig, steps: int | None = None) -> tuple[float, bool]:
    """L_P's exponent at step ``it`` of ``steps`` (default ``config.iters``), and whether L_P is on yet
    (always, unless annealed)."""
    if not config.anneal_beta:
        return config.beta, True
    steps = config.iters if steps is None else steps
    warm = int(BETA_WARMUP * steps)
    t = max(0.0, (it - warm) / max(steps - warm, 1))
    beta = BETA_END + 0.5 * (BETA_START - BETA_END) * (1 + math.cos(t * math.pi))
    return beta, it >= warm


def _per_image(y: torch.Tensor) -> float:
    """The reference's L_A is the squared error summed over channels (dim 1) and averaged over batch and
    positions: the plain sum times this."""
    return (y.shape[1] if y.dim() > 1 else 1) / y.numel()


def _per_image_sum(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reference's L_A of ``y``, in one fused pass."""
    return torch.nn.functional.mse_loss(y, target, reduction="sum") * _per_image(y)


def _flip_cost(problem: LayerProblem, s: torch.Tensor, generator: torch.Generator | None) -> float:
    """L_A of moving every weight by one integer step in a random direction: what 'flip everything' costs.

    Dividing L_A by it makes the trade-off against L_F (in integer units) the same at every bit width,
    layer size and input scale. Measured PROBE_ROWS inputs at a time: a few MiB of outputs, not the
    probe's (ResNet-18's first block: 128 MiB more at the defense's peak).
    """
    x = problem.inputs[:PROBE_SIZE]
    zeros = torch.zeros_like(problem.weight)
    out = problem.targets  # the unit's outputs: the shape each forward below gives
    per_image = (out.shape[1] if out.dim() > 1 else 1) / (out[0].numel() * x.shape[0])  # as _per_image
    costs = []
    with torch.no_grad():
        for _ in range(FLIP_COST_SAMPLES):
            signs = (
                torch.randint(0, 2, problem.weight.shape, generator=generator).to(problem.weight.device) * 2.0
                - 1
            )
            moved = signs * s
            total = 0.0
            for rows in x.split(PROBE_ROWS):
                total += float(
                    torch.nn.functional.mse_loss(
                        problem.forward(rows, moved), problem.forward(rows, zeros), reduction="sum"
                    )
                )
            costs.append(total * per_image)
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


@dataclass(frozen=True)
class _RoundingTerms:
    """L_F and L_P's V-independent factors (``Objective._freeze``)."""

    flip_a: torch.Tensor
    flip_b: torch.Tensor
    flip_w: torch.Tensor  # L_F's weight per element: flip_weight x scale x truncation error, 0 if not free
    flip_wb: torch.Tensor  # flip_w x flip_b, for the gradient
    free: torch.Tensor  # 1.0 where the element is learned, as float
    neg_half_free: torch.Tensor  # -free / 2
    n_free: float
    penalty_w: float


def _bce_argument(h: torch.Tensor, terms: _RoundingTerms, out: torch.Tensor | None = None) -> torch.Tensor:
    """h + eps where the target is up, 1 - h + eps where it is down; at least eps, as in the reference:
    1 + eps is 1 in float32, and h reaches 1 exactly (the stretched rectifier's clip, a saturated sigmoid)."""
    return torch.addcmul(terms.flip_a, terms.flip_b, h, out=out).clamp_min_(BCE_EPS)


def _rounding_values(
    h: torch.Tensor, terms: _RoundingTerms, beta: float, with_flip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_F, L_P) of h: L_F = -sum flip_w * log(flip_a + flip_b * h); L_P = penalty_w * sum free * (1 - |2h - 1|^beta)."""
    l_f = h.new_zeros(())
    if with_flip:
        l_f = -torch.dot(terms.flip_w.reshape(-1), _bce_argument(h, terms).log_().reshape(-1))
    u = h * 2 - 1
    peaked = u.square() if beta == 2 else u.abs().pow(beta)
    l_p = terms.penalty_w * (terms.n_free - torch.dot(terms.free.reshape(-1), peaked.reshape(-1)))
    return l_f, l_p


def _rounding_gradient(
    h: torch.Tensor,
    terms: _RoundingTerms,
    beta: float,
    with_flip: bool,
    with_penalty: bool,
    out: torch.Tensor,
    scratch: torch.Tensor,
) -> torch.Tensor | None:
    """d(L_F + L_P)/dh in closed form, into ``out`` (``scratch``: a weight-sized temporary): a few passes
    over the weight, where autograd takes about fourteen (and a small layer's step would otherwise pay
    autograd's per-node overhead). None when neither is on."""
    grad = None
    if with_penalty:
        # -2 beta penalty_w free |2h - 1|^(beta - 1) sign(2h - 1); at beta 2: -8 penalty_w free (h - 1/2)
        if beta == 2:
            grad = torch.addcmul(terms.neg_half_free, terms.free, h, out=out).mul_(-8 * terms.penalty_w)
        else:
            u = torch.mul(h, 2, out=out).sub_(1)
            magnitude = torch.abs(u, out=scratch).pow_(beta - 1)  # scratch is free again below
            grad = u.sign_().mul_(magnitude).mul_(terms.free).mul_(-2 * beta * terms.penalty_w)
    if with_flip:  # -flip_w flip_b / (flip_a + flip_b h)
        denominator = _bce_argument(h, terms, scratch)
        if grad is None:
            grad = torch.div(terms.flip_wb, denominator, out=out).neg_()
        else:
            grad.addcdiv_(terms.flip_wb, denominator, value=-1)
    return grad


@dataclass
class Objective:
    """One layer's loss terms as functions of the rounding logits V, with everything they need fixed.

    Each step touches every weight several times, so whatever does not depend on V is computed once
    (``_freeze``): a step costs the layer's forward + backward plus a handful of element-wise passes.
    """

    problem: LayerProblem
    config: EFRAPConfig
    s: torch.Tensor
    z: torch.Tensor
    base: torch.Tensor
    frac: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    learnable: torch.Tensor
    nearest: torch.Tensor
    target: torch.Tensor
    err: torch.Tensor
    flip_scale: float
    act_scale: float
    free: torch.Tensor | None = (
        None  # learnable and not forced (force_flips); every learnable element at first
    )
    fixed: torch.Tensor | None = None  # the integers of the other elements: nearest, or flipped where forced

    def __post_init__(self) -> None:
        if self.free is None:
            self.free, self.fixed = self.learnable, self.nearest
        self._scales: dict[tuple[int, ...], torch.Tensor] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._freeze()

    def _freeze(self) -> None:
        """The V-independent parts of the terms, for the current ``free`` / ``fixed`` split.

        W~ = s * (floor(W / s) + clamp(h, h_lo, h_hi)) with h in (0, 1) is affine in h: h passes where
        the bounds do not bind (h_lo <= 0, h_hi >= 1; a free element off the grid's edge), elsewhere the
        bound, or the fixed integer of an element that is not free, is a constant. L_F's cross-entropy
        against the 0/1 target is -log(flip_a + flip_b * h).
        """
        offset = self.base + self.z
        h_lo = torch.where(self.free, self.lo - offset, self.fixed - offset)
        h_hi = torch.where(self.free, self.hi - offset, self.fixed - offset)
        passes = self.free & (h_lo <= 0) & (h_hi >= 1)
        pinned = torch.where(h_lo >= 1, h_lo, torch.minimum(h_hi, torch.zeros_like(h_hi)))
        self._w_slope = torch.where(passes, self.s, 0.0)
        self._w_const = self.s * (self.base + torch.where(passes, 0.0, pinned))
        free = self.free.to(torch.float32)
        penalty_scale = self.flip_scale if self.config.balance == "lsb" else 1.0
        flip_w = self.config.flip_weight * self.flip_scale * self.err * free
        flip_b = 2.0 * self.target - 1.0
        self._terms = _RoundingTerms(
            flip_a=1.0 - self.target + BCE_EPS,
            flip_b=flip_b,
            flip_w=flip_w,
            flip_wb=flip_w * flip_b,
            free=free,
            neg_half_free=-0.5 * free,
            n_free=float(free.sum()),
            penalty_w=self.config.round_weight * penalty_scale,
        )

    @classmethod
    def build(
        cls, problem: LayerProblem, config: EFRAPConfig, generator: torch.Generator | None
    ) -> Objective:
        scheme, w = problem.scheme, problem.weight.detach().to(torch.float32)
        scale, zp = problem.scale, problem.zero_point
        s, z = expand(scale, w), expand(zp, w)
        base = torch.floor(w / s)
        frac = w / s - base
        lo, hi, frozen = learnable_bounds(w, scheme, scale, zp)
        nearest = scheme.quantize(w, scale, zp).to(torch.float32)
        target = 1.0 - (frac > 0.5).to(torch.float32)  # flip nearest; frac exactly 0.5 counts as down
        err = _flip_errors(truncation_error(w, scheme, scale, zp), config)
        if config.balance == "lsb":
            err = err / s
            flip_scale = 1.0 / w.numel()
            act_scale = 1.0 / max(_flip_cost(problem, s, generator), _COST_FLOOR)
        else:
            flip_scale, act_scale = 1.0, 1.0
        return cls(
            problem, config, s, z, base, frac, lo, hi, ~frozen, nearest, target, err, flip_scale, act_scale
        )

    def force_flips(self, share: float) -> None:
        """L_F as a constraint (budget mode): flip the rounding of the ``share`` of learnable elements
        with the largest truncation error, and learn only the others from now on.

        Unlike L_F's weight, the share measures how far the layer moves from nearest rounding: a larger
        share always flips more, so a budget can search it from weak to strong.
        """
        k = round(share * int(self.learnable.sum()))
        forced = torch.zeros(self.learnable.numel(), dtype=torch.bool, device=self.learnable.device)
        if k > 0:
            steps = torch.minimum(self.frac, 1 - self.frac)  # truncation error in integer steps
            score = torch.where(self.learnable, steps, torch.full_like(steps, -1.0))
            forced[score.reshape(-1).topk(k).indices] = True
        forced = forced.reshape(self.learnable.shape)
        flipped = torch.minimum(torch.maximum(self.base + self.target + self.z, self.lo), self.hi)
        self.free, self.fixed = self.learnable & ~forced, torch.where(forced, flipped, self.nearest)
        self._freeze()

    def soft_weight(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """W~(V) = s * (clamp(floor(W / s) + h(V) + z, lo, hi) - z); other elements at their fixed integers."""
        return torch.addcmul(self._w_const, self._w_slope, h, out=out)

    def terms(self, v: torch.Tensor, idx: torch.Tensor | slice, beta: float) -> tuple[torch.Tensor, ...]:
        """(L_A, L_F, L_P) on the cached inputs ``idx`` (indices, or a slice); an ablation's missing
        term is zero. The objective's definition: ``gradient`` is its derivative, ``probe_loss`` its sum."""
        h = rectify(v, self.config.rectifier)
        l_a = (
            self._preservation(self.soft_weight(h), idx)
            if self.config.objective != "flip_only"
            else h.new_zeros(())
        )
        return (l_a, *_rounding_values(h, self._terms, beta, self._with_flip))

    def gradient(
        self,
        v: torch.Tensor,
        idx: torch.Tensor,
        beta: float,
        with_penalty: bool = True,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """dL/dV on the cached inputs ``idx``: what an optimizer step uses; into ``out`` where given.
        Autograd runs through the layer alone (what a bare forward + backward costs); h(V), the soft
        weight, L_F and L_P are chained in closed form, their per-op overhead being most of a small
        layer's step otherwise. Its weight-sized temporaries live as long as the objective: memory freed
        and faulted in again every step is slow on a busy machine."""
        config = self.config  # V is a plain tensor: nothing below records a graph but the layer's forward
        h, sig, stretched = _rectify_parts(v, config.rectifier, self._buffer("sigmoid", v))
        scratch = self._buffer("weight", v)  # L_F's denominator first, then the soft weight
        grad = _rounding_gradient(
            h, self._terms, beta, self._with_flip, with_penalty, self._buffer("rounding", v), scratch
        )
        if config.objective != "flip_only":
            with torch.enable_grad():  # a caller's no_grad must not break the step
                w = self.soft_weight(h, out=scratch).detach().requires_grad_(True)
                x, t = self._batch(idx)
                y = self.problem.forward(x, w)
                squared = torch.nn.functional.mse_loss(y, t, reduction="sum")
                (grad_w,) = torch.autograd.grad(squared, w, self._preservation_scale(y))
            through = grad_w.mul_(self._w_slope)
            grad = through if grad is None else grad.add_(through)
        if grad is None:  # preserve_only during an annealed warm-up: nothing moves V
            return torch.zeros_like(v) if out is None else out.zero_()
        if stretched is not None:  # clamp's and the stretch's derivatives
            grad = torch.where((stretched >= 0) & (stretched <= 1), grad, 0.0).mul_(ZETA - GAMMA)
        if out is None:
            return torch.ops.aten.sigmoid_backward(grad, sig)
        return torch.ops.aten.sigmoid_backward.grad_input(grad, sig, grad_input=out)

    @property
    def _with_flip(self) -> bool:
        return self.config.objective != "preserve_only" and self.config.budget is None

    def _batch(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached inputs and float targets ``idx`` (indices, or a slice: views), valid until the
        next call."""
        problem = self.problem
        if isinstance(idx, slice):
            return problem.inputs[idx], problem.targets[idx]
        x, t = problem.inputs, problem.targets
        return (
            torch.index_select(x, 0, idx, out=self._buffer("inputs", x, len(idx))),
            torch.index_select(t, 0, idx, out=self._buffer("targets", t, len(idx))),
        )

    def _buffer(self, name: str, like: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """A temporary shaped like ``like`` (with ``rows`` rows where given), kept for the next step."""
        shape = like.shape if rows is None else (rows, *like.shape[1:])
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def _preservation(self, w: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
        """L_A of the soft weight ``w`` on the cached inputs ``idx``."""
        x, t = self._batch(idx)
        return _per_image_sum(self.problem.forward(x, w), t) * self.act_scale

    def _preservation_scale(self, y: torch.Tensor) -> torch.Tensor:
        """dL_A / d(squared error sum) for outputs shaped like ``y``: the factor autograd would carry
        through ``_preservation``'s two products (the same float32 roundings), made once per shape."""
        key = tuple(y.shape)
        if key not in self._scales:
            one = torch.ones((), dtype=y.dtype, device=y.device)
            self._scales[key] = (one * self.act_scale) * _per_image(y)
        return self._scales[key]

    def probe_loss(self, v: torch.Tensor, beta: float) -> float:
        """L_A + L_F + L_P on the first PROBE_SIZE cached inputs, PROBE_ROWS at a time: the loss the
        plan reports before and after a layer's optimisation."""
        n = min(self.problem.inputs.shape[0], PROBE_SIZE)
        h = rectify(v, self.config.rectifier)
        total = 0.0
        if self.config.objective != "flip_only":
            w = self.soft_weight(h)
            for start in range(0, n, PROBE_ROWS):
                rows = slice(start, min(start + PROBE_ROWS, n))
                total += float(self._preservation(w, rows)) * (rows.stop - rows.start) / n
        l_f, l_p = _rounding_values(h, self._terms, beta, self._with_flip)
        return total + float(l_f) + float(l_p)

    def hard_round(self, v: torch.Tensor) -> torch.Tensor:
        """Up where V >= 0, else down, within the bounds; other elements at their fixed integers. int32."""
        up = (v >= 0).to(torch.float32)
        q = torch.minimum(torch.maximum(self.base + up + self.z, self.lo), self.hi)
        return torch.where(self.free, q, self.fixed).to(torch.int32)
