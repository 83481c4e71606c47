"""RoundingPlan: the defense's output, a frozen record of every layer's integers and grid.

Serialised as one safetensors file whose header carries the JSON metadata: no pickle anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelError, PlanMismatchError
from .files import atomic_write, read_safetensors
from .layers import QUANTIZABLE, fingerprint, prepare_model
from .schemes import QuantScheme

__all__ = ["LayerPlan", "RoundingPlan", "snap_weight"]

_FORMAT = "efrap-plan/1"


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


@dataclass(frozen=True)
class RoundingPlan:
    """The learned rounding of every quantized layer of one model, for one scheme."""

    scheme: QuantScheme
    layers: Mapping[str, LayerPlan]
    source: str = "torch"
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerPlan:
        return self.layers[name]

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
        modules = {n: m for n, m in prepared.named_modules() if isinstance(m, QUANTIZABLE)}
        missing = sorted(set(self.layers) - set(modules))
        if missing:
            raise PlanMismatchError(
                f"plan: layers {missing} are not in {type(model).__name__}; this plan was made for another model"
            )
        for name, lp in self.layers.items():
            got = fingerprint(modules[name].weight)
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
                modules[name].weight.copy_(lp.dequantized(self.scheme).reshape(modules[name].weight.shape))
        return prepared

    def snap(self, model: nn.Module) -> nn.Module:
        """A float copy whose weights the backend's stock nearest rounding turns into the plan's integers.

        Weights sit at scale * (q - z); each channel's abs-max element keeps its exact float value so an
        absmax backend recomputes the very same scale.
        """
        prepared, modules = self._matched_layers(model)
        with torch.no_grad():
            for name, lp in self.layers.items():
                weight = modules[name].weight
                modules[name].weight.copy_(snap_weight(weight, lp, self.scheme))
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
            "scheme": json.dumps(self.scheme.to_dict()),
            "source": self.source,
            "layers": json.dumps(layers_meta),
            "meta": json.dumps(dict(self.meta)),
        }
        return atomic_write(Path(path), st_save(tensors, metadata=header))

    @classmethod
    def load(cls, path: str | Path) -> RoundingPlan:
        header, tensors = read_safetensors(path, "plan", "a file written by RoundingPlan.save")
        if header.get("format") != _FORMAT:
            raise ModelError(
                f"plan: {path} is not an efrap plan (format {header.get('format')!r}, expected {_FORMAT!r})"
            )
        layers = {}
        for entry in json.loads(header["layers"]):
            key = entry["key"]
            layers[entry["name"]] = LayerPlan(
                entry["name"],
                tensors[f"{key}.integers"],
                tensors[f"{key}.scale"],
                tensors[f"{key}.zero_point"],
                tensors[f"{key}.nearest"],
                entry["fingerprint"],
                entry.get("stats", {}),
            )
        scheme = QuantScheme.from_dict(json.loads(header["scheme"]))
        return cls(scheme, layers, header.get("source", "torch"), json.loads(header.get("meta", "{}")))


def snap_weight(weight: torch.Tensor, lp: LayerPlan, scheme: QuantScheme) -> torch.Tensor:
    """Float weights on the plan's grid that the backend re-rounds to exactly ``lp.integers``."""
    snapped = lp.dequantized(scheme).reshape(weight.shape)
    if scheme.range_rule != "absmax":
        return snapped
    absmax = scheme.absmax(weight)
    snapped = torch.maximum(torch.minimum(snapped, absmax), -absmax)
    return torch.where(scheme.scale_setters(weight), weight.detach().to(torch.float32), snapped)
