"""Patch triggers, pasted in [0, 1] image space before any normalisation, serialisable to JSON so an
attack's trigger travels with the model it made."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import torch

from ..data import LabeledData
from ..errors import EFRAPError

__all__ = ["PatchTrigger"]


@dataclass(frozen=True)
class PatchTrigger:
    """A square patch of constant value; ``row``/``col`` of its top-left corner, negative from the end."""

    size: int = 4
    """Side of the square patch, in pixels."""
    row: int = -5
    """Top row of the patch; negative counts from the bottom (-5 with size 4: one pixel in)."""
    col: int = -5
    """Left column of the patch; negative counts from the right."""
    value: float = 1.0
    """Pixel value pasted into every channel (1.0 is white)."""
    target: int = 0
    """The attacker's target label."""

    def __post_init__(self) -> None:
        for name in ("size", "row", "col", "target"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise EFRAPError(f"PatchTrigger.{name}: expected an integer, got {value!r}")
        if not isinstance(self.value, (int, float)) or isinstance(self.value, bool):
            raise EFRAPError(f"PatchTrigger.value: expected a number, got {self.value!r}")
        if self.size < 1:
            raise EFRAPError(f"PatchTrigger.size: expected a positive number of pixels, got {self.size}")
        if self.target < 0:
            raise EFRAPError(f"PatchTrigger.target: expected a label >= 0, got {self.target}")

    @classmethod
    def corner(cls, size: int, margin: int = 1, value: float = 1.0, target: int = 0) -> PatchTrigger:
        """A patch ``margin`` pixels in from the bottom-right corner (the attacks' default)."""
        return cls(size, -(size + margin), -(size + margin), value, target)

    def _origin(self, height: int, width: int) -> tuple[int, int]:
        r = self.row if self.row >= 0 else height + self.row
        c = self.col if self.col >= 0 else width + self.col
        if r < 0 or c < 0 or r + self.size > height or c + self.size > width:
            raise EFRAPError(
                f"PatchTrigger: a {self.size}x{self.size} patch at ({self.row}, {self.col}) does not fit "
                f"a {height}x{width} image; use a smaller size or another position"
            )
        return r, c

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A triggered copy of N x C x H x W images."""
        if x.dim() != 4:
            raise EFRAPError(f"PatchTrigger.apply: expected N x C x H x W images, got shape {tuple(x.shape)}")
        r, c = self._origin(x.shape[-2], x.shape[-1])
        out = x.clone()
        out[:, :, r : r + self.size, c : c + self.size] = self.value
        return out

    def poisoned(self, data: LabeledData, labels: str = "target") -> LabeledData:
        """Triggered non-target images, labelled with the target ('target') or their own label ('true')."""
        if self.target >= data.num_classes:
            raise EFRAPError(
                f"PatchTrigger.target: {self.target} is not one of the {data.num_classes} classes"
            )
        keep = data.y != self.target
        y = torch.full_like(data.y[keep], self.target) if labels == "target" else data.y[keep]
        return LabeledData(self.apply(data.x[keep]), y, data.num_classes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchTrigger:
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - fields:
            raise EFRAPError(f"PatchTrigger: expected a dict with keys among {sorted(fields)}, got {data!r}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> PatchTrigger:
        return cls.from_dict(json.loads(text))
