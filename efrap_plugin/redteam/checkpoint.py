"""Zoo models to and from safetensors, with the architecture in the header: no pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import EFRAPError, ModelError
from ..files import atomic_write, read_safetensors, safetensors_shapes
from .models import build_model

__all__ = ["save_model", "load_model"]

_HINT = "a .safetensors file written by `efrap attack`"


def save_model(model: nn.Module, path: str | Path, arch: dict[str, Any]) -> Path:
    """Write the state dict and ``arch`` (build_model's arguments) atomically."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(Path(path), save(state, metadata={"arch": json.dumps(arch)}))


def _checked_arch(path: Path, meta: dict[str, str], shapes: dict[str, tuple]) -> dict[str, Any]:
    """The header's architecture, built on the meta device first: a header that declares a model other
    than the tensors the file holds (say, a huge width in a tiny file) is refused before any allocation."""
    if "arch" not in meta:
        raise ModelError(
            f"model: {path} has no 'arch' metadata; load it with your own model class and load_state_dict"
        )
    try:
        arch = json.loads(meta["arch"])
        if not isinstance(arch, dict):
            raise ValueError(f"expected a JSON object, got {type(arch).__name__}")
        with torch.device("meta"):
            skeleton = build_model(**arch)
    except EFRAPError as exc:
        raise ModelError(f"model: {path}: 'arch' metadata: {exc}") from None
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ModelError(f"model: {path}: unusable 'arch' metadata ({exc}); pass {_HINT}") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if expected != shapes:
        differ = sorted(k for k in expected.keys() | shapes.keys() if expected.get(k) != shapes.get(k))
        raise ModelError(
            f"model: {path} does not match architecture {arch}: tensors {differ[:5]} differ in name or shape; "
            f"pass {_HINT}"
        )
    return arch


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A zoo model rebuilt from its safetensors file, in eval mode."""
    path = Path(path)
    arch = _checked_arch(path, *safetensors_shapes(path, "model", _HINT))
    _, state = read_safetensors(path, "model", _HINT)
    model = build_model(**arch)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"model: {path} does not match architecture {arch} ({exc})") from None
    return model.eval(), arch
