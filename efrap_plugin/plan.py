"""RoundingPlan: the defense's output, a frozen record of every layer's integers and grid.

Serialised as one safetensors file whose header carries the JSON metadata: no pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import EFRAPError, ModelError, PlanMismatchError
from .files import atomic_write, read_safetensors
from .layers import core_weight, fingerprint, layer_kinds, prepare_model, weight_axis
from .schemes import QuantScheme

__all__ = ["LayerPlan", "PlanMeta", "RoundingPlan", "snap_integers", "snap_weight"]

_FORMAT = "efrap-plan/2"
_HEADER_KEY = "efrap-plan"  # one metadata entry: safetensors writes several in a random order
_FORMAT_V1 = "efrap-plan/1"  # separate metadata entries, read for files written before 0.2


@dataclass(frozen=True)
class LayerPlan:
    """One layer: integers on the scheme's grid (axis 0 = output channel), scale, zero point."""

    name: str
    integers: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    nearest: torch.Tensor
    fingerprint: str
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def flipped_share(self) -> float:
        """Share of integers that differ from round-to-nearest."""
        return float((self.integers != self.nearest).float().mean())

    def dequantized(self, scheme: QuantScheme) -> torch.Tensor:
        return scheme.dequantize(self.integers, self.scale, self.zero_point)

    def in_weight_layout(self, weight: torch.Tensor, axis: int) -> LayerPlan:
        """This plan, learned on ``weight`` with its channel axis ``axis`` moved first (the core's layout:
        a ConvTranspose keeps its output channels on axis 1), back in the weight's own layout: what the
        backend stores and its verify reads back."""
        if axis == 0:
            return self
        return dataclasses.replace(
            self,
            integers=self.integers.movedim(0, axis).contiguous(),
            nearest=self.nearest.movedim(0, axis).contiguous(),
            fingerprint=fingerprint(weight.detach()),
        )


@dataclass(frozen=True, kw_only=True)
class PlanMeta:
    """What a plan records beside its integers: how it was learned and what of the model it covers.

    Typed, so that a producer and every reader (verify, the CLI, apply) agree on each entry's name; a
    plan file's keys this version does not know are kept in ``extra`` and written back as read.
    """

    config: Mapping[str, Any] = field(default_factory=dict)
    """The EFRAPConfig the plan was learned with (``EFRAPConfig.to_dict()``), its producer's choices
    of ``layer_inputs`` and ``unit`` filled in."""
    flow: str | None = None
    """The route that learned it: "torch", "pt2e", "torch.ao", "brevitas", "onnxruntime"."""
    calib_size: int | None = None
    """Calibration inputs the optimisation used (budget mode's held-out ones not counted)."""
    skipped: Mapping[str, str] = field(default_factory=dict)
    """Quantized layers left at the backend's own rounding, each with the reason."""
    constants: Mapping[str, str] = field(default_factory=dict)
    """Quantized tensors that are no layer's weight (an embedding table), each with its readers."""
    grids: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Each layer's own grid (``grid_record``) where the layers of one model may round to different
    grids; a layer not listed rounds to the plan's scheme."""
    layout: Mapping[str, Mapping[str, Any]] | None = None
    """ONNX plans: where each layer's integers and scale are stored in the graph; None elsewhere."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Entries of a plan file this version does not know, kept as read."""

    @property
    def layer_inputs(self) -> str | None:
        return self.config.get("layer_inputs")

    @property
    def unit(self) -> str | None:
        return self.config.get("unit")

    def replace(self, **changes: Any) -> PlanMeta:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        known = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **{k: _plain(v) for k, v in known.items() if v is not None}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanMeta:
        """A plan file's metadata; older files' entries (``layer_inputs``, ``unit`` beside the config)
        are read into their place."""
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: data.pop(k) for k in list(data) if k in known}
        config = dict(values.get("config") or {})
        for moved in ("layer_inputs", "unit"):  # written beside the config before it held them
            if moved in data:
                config[moved] = data.pop(moved)
        values["config"] = config
        for name in ("skipped", "constants", "grids"):
            if not isinstance(values.get(name, {}), Mapping):
                raise ValueError(f"meta entry {name!r} is {type(values[name]).__name__}, expected an object")
        return cls(**values, extra=data)


def _plain(value: Any) -> Any:
    """A metadata value as JSON writes it: mappings as dicts."""
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, Mapping) else value


@dataclass(frozen=True)
class RoundingPlan:
    """The learned rounding of every quantized layer of one model, for one scheme."""

    scheme: QuantScheme
    layers: Mapping[str, LayerPlan]
    source: str = "torch"
    meta: PlanMeta = field(default_factory=PlanMeta)

    def __post_init__(self) -> None:
        if not isinstance(self.meta, PlanMeta):
            object.__setattr__(self, "meta", PlanMeta.from_dict(self.meta or {}))

    def __getitem__(self, name: str) -> LayerPlan:
        return self.layers[name]

    @property
    def disagreement(self) -> float | None:
        """Budget mode: percent of held-out calibration inputs whose top-1 differs from the float model's,
        measured on the finished model (the last layer's measurement); None without a budget."""
        return self._finished("disagreement")

    @property
    def margin_risk(self) -> float | None:
        """Budget mode: percent of held-out calibration inputs whose float class's margin the finished
        model halves or loses (``EFRAPConfig.margin_cap``); None without a budget."""
        return self._finished("margin_risk")

    @property
    def resolution(self) -> float | None:
        """Budget mode: what one held-out decision weighs, in percent (100 / the held-out inputs): the
        finest disagreement or margin risk the plan's figures can tell apart; None without a budget."""
        return self._finished("resolution")

    def _finished(self, stat: str) -> float | None:
        """A held-out measurement of the finished model: the last layer's."""
        last = list(self.layers.values())[-1] if self.layers else None
        return None if last is None or stat not in last.stats else float(last.stats[stat])

    @property
    def flipped_share(self) -> float:
        total = sum(lp.integers.numel() for lp in self.layers.values())
        flipped = sum(int((lp.integers != lp.nearest).sum()) for lp in self.layers.values())
        return flipped / max(total, 1)

    # ----- torch models --------------------------------------------------------------------------
    def _matched_layers(self, model: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
        if self.source != "torch":
            raise PlanMismatchError(
                f"plan: made from a {self.source} model; apply it with the {self.source} adapter, not to a torch module"
            )
        prepared = prepare_model(model, self.scheme)
        kinds = layer_kinds(self.scheme.learns_conv_transpose)
        modules = {n: m for n, m in prepared.named_modules() if isinstance(m, kinds)}
        missing = sorted(set(self.layers) - set(modules))
        if missing:
            raise PlanMismatchError(
                f"plan: layers {missing} are not in {type(model).__name__}; this plan was made for another model"
            )
        for name, lp in self.layers.items():
            got = fingerprint(core_weight(modules[name]))
            if got != lp.fingerprint:
                raise PlanMismatchError(
                    f"plan: layer {name!r} weights differ from the ones the plan was made from "
                    f"(fingerprint {got} != {lp.fingerprint}); run defend() on this model instead"
                )
        return prepared, modules

    def apply(self, model: nn.Module) -> nn.Module:
        """A fake-quantized copy: BatchNorm folded as the backend does, weights = scale * (q - z)."""
        prepared, modules = self._matched_layers(model)
        with torch.no_grad():
            for name, lp in self.layers.items():
                module = modules[name]
                module.weight.copy_(
                    lp.dequantized(self.scheme).movedim(0, weight_axis(module)).reshape(module.weight.shape)
                )
        return prepared

    def snap(self, model: nn.Module) -> nn.Module:
        """A float copy whose weights the backend's stock nearest rounding turns into the plan's integers.

        Weights sit at scale * (q - z); each channel's abs-max element keeps its exact float value so an
        absmax backend recomputes the very same scale.
        """
        prepared, modules = self._matched_layers(model)
        with torch.no_grad():
            for name, lp in self.layers.items():
                module = modules[name]
                module.weight.copy_(
                    snap_weight(core_weight(module), lp, self.scheme).movedim(0, weight_axis(module))
                )
        return prepared

    # ----- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.safetensors) atomically: tensors plus JSON metadata in the header."""
        from safetensors.torch import save as st_save

        tensors: dict[str, torch.Tensor] = {}
        layers_meta = []
        for i, (name, lp) in enumerate(self.layers.items()):
            key = f"layer{i}"
            tensors[f"{key}.integers"] = lp.integers.contiguous()
            tensors[f"{key}.nearest"] = lp.nearest.contiguous()
            tensors[f"{key}.scale"] = lp.scale.contiguous().to(torch.float32)
            tensors[f"{key}.zero_point"] = lp.zero_point.contiguous().to(torch.int32)
            layers_meta.append({"key": key, "name": name, "fingerprint": lp.fingerprint, "stats": lp.stats})
        header = {
            "format": _FORMAT,
            "scheme": self.scheme.to_dict(),
            "source": self.source,
            "layers": layers_meta,
            "meta": self.meta.to_dict(),
        }
        metadata = {_HEADER_KEY: json.dumps(header, sort_keys=True)}
        return atomic_write(Path(path), st_save(tensors, metadata=metadata))

    @classmethod
    def load(cls, path: str | Path) -> RoundingPlan:
        """Read a plan written by ``save``; anything else is refused with a ModelError naming the problem."""
        raw, tensors = read_safetensors(path, "plan", "a file written by RoundingPlan.save")
        try:
            header = _parse_header(raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelError(f"plan: {path} is damaged: its header is not valid plan JSON ({exc})") from None
        if header.get("format") not in (_FORMAT, _FORMAT_V1):
            raise ModelError(
                f"plan: {path} is not an efrap plan (format {header.get('format')!r}, expected {_FORMAT!r})"
            )
        try:
            layers = {}
            for entry in header["layers"]:
                key = entry["key"]
                if entry["name"] in layers:
                    raise ModelError(
                        f"plan: {path} is damaged: layer {entry['name']!r} is listed twice; save the plan again"
                    )
                layers[entry["name"]] = LayerPlan(
                    entry["name"],
                    tensors[f"{key}.integers"],
                    tensors[f"{key}.scale"],
                    tensors[f"{key}.zero_point"],
                    tensors[f"{key}.nearest"],
                    entry["fingerprint"],
                    dict(entry.get("stats", {})),
                )
            scheme = QuantScheme.from_dict(header["scheme"])
            meta = PlanMeta.from_dict(header.get("meta") or {})
        except ModelError:
            raise
        except EFRAPError as exc:
            raise ModelError(f"plan: {path} holds an invalid scheme ({exc})") from None
        except KeyError as exc:
            raise ModelError(
                f"plan: {path} is damaged: entry or tensor {exc} is missing; save the plan again"
            ) from None
        except (ValueError, TypeError, AttributeError) as exc:
            raise ModelError(f"plan: {path} is damaged: its header is not valid plan JSON ({exc})") from None
        for name, lp in layers.items():
            if lp.integers.shape != lp.nearest.shape or lp.scale.numel() != lp.zero_point.numel():
                raise ModelError(
                    f"plan: {path} is damaged: layer {name!r} has integers {tuple(lp.integers.shape)}, nearest "
                    f"{tuple(lp.nearest.shape)}, {lp.scale.numel()} scales and {lp.zero_point.numel()} zero points"
                )
        for name, lp in layers.items():
            problem = _value_problem(lp, scheme, meta.grids.get(name))
            if problem:
                raise ModelError(f"plan: {path} is damaged: layer {name!r} {problem}; save the plan again")
        return cls(scheme, layers, str(header.get("source", "torch")), meta)


def _value_problem(lp: LayerPlan, scheme: QuantScheme, grid: Mapping[str, Any] | None) -> str | None:
    """What makes a layer's values unusable, or None: integers off its grid or not whole, scales that are
    not finite and positive, a scale count that fits no channel axis, zero points that are not whole."""
    try:
        qmin, qmax = (int(grid["qmin"]), int(grid["qmax"])) if grid else (scheme.qmin, scheme.qmax)
        per_channel = bool(grid.get("per_channel", scheme.per_channel)) if grid else scheme.per_channel
    except (KeyError, TypeError, ValueError):
        return f"has an unreadable grid record {grid!r}"
    for what, t in (("integers", lp.integers), ("nearest", lp.nearest), ("zero points", lp.zero_point)):
        values = t.to(torch.float64)
        if not bool(torch.isfinite(values).all()) or not bool((values == values.round()).all()):
            return f"holds {what} that are not whole numbers"
    for what, t in (("integers", lp.integers), ("nearest", lp.nearest)):
        if t.numel() and (int(t.min()) < qmin or int(t.max()) > qmax):
            return f"holds {what} in [{int(t.min())}, {int(t.max())}], off its grid [{qmin}, {qmax}]"
    scale = lp.scale.to(torch.float64)
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        return "holds scales that are not finite and positive"
    channels = set(lp.integers.shape) if lp.integers.dim() else {1}
    grouped = scale.dim() == 2 and lp.integers.dim() and scale.shape[0] == lp.integers.shape[0]
    if grouped and lp.integers[0].numel() % scale.shape[1] == 0:
        return None  # per group: [C, groups] along each channel's flattened inputs
    if scale.numel() != 1 and scale.numel() not in channels:
        return f"holds {scale.numel()} scales for integers of shape {tuple(lp.integers.shape)}"
    if per_channel and scale.numel() == 1 and lp.integers.dim() and lp.integers.shape[0] > 1:
        return f"holds one scale for a per-channel grid over {lp.integers.shape[0]} channels"
    return None


def _parse_header(raw: dict[str, str]) -> dict[str, Any]:
    """The plan header as one dict, from this version's single entry or a version-1 file's several."""
    if _HEADER_KEY in raw:
        header = json.loads(raw[_HEADER_KEY])
        if not isinstance(header, dict):
            raise ValueError(f"expected a JSON object, got {type(header).__name__}")
        return header
    if raw.get("format") != _FORMAT_V1:
        return {"format": raw.get("format")}
    return {
        "format": _FORMAT_V1,
        "scheme": json.loads(raw["scheme"]),
        "source": raw.get("source", "torch"),
        "layers": json.loads(raw["layers"]),
        "meta": json.loads(raw.get("meta", "{}")),
    }


def grid_record(scheme: QuantScheme, **extra: Any) -> dict[str, Any]:
    """A layer's own grid as plans record it in ``meta["grids"]`` (adapters whose layers may each round
    to another grid); the conformance check reads its range."""
    return {
        "bits": scheme.bits,
        "qmin": scheme.qmin,
        "qmax": scheme.qmax,
        "per_channel": scheme.per_channel,
        **extra,
    }


def snap_weight(weight: torch.Tensor, lp: LayerPlan, scheme: QuantScheme) -> torch.Tensor:
    """Float weights on the plan's grid that the backend re-rounds to exactly ``lp.integers``."""
    return snap_integers(weight, lp.integers, lp.scale, lp.zero_point, scheme)


def snap_integers(
    weight: torch.Tensor,
    integers: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    scheme: QuantScheme,
) -> torch.Tensor:
    """Float weights ``scale * (integers - zero_point)`` shaped like ``weight``, which the backend's own
    nearest rounding turns back into ``integers``; for absmax grids each scale-setting element keeps its
    exact float value (and nothing reaches past it), so the backend recomputes the very same scale."""
    snapped = scheme.dequantize(integers, scale, zero_point).reshape(weight.shape)
    if scheme.range_rule != "absmax":
        return snapped
    absmax = scheme.absmax(weight)
    snapped = torch.maximum(torch.minimum(snapped, absmax), -absmax)
    return torch.where(scheme.scale_setters(weight), weight.detach().to(torch.float32), snapped)
