"""Zoo models to and from safetensors, with the architecture in the header: no pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ModelError
from .files import atomic_write, read_safetensors
from .models import build_model

__all__ = ["save_model", "load_model"]


def save_model(model: nn.Module, path: str | Path, arch: dict[str, Any]) -> Path:
    """Write the state dict and ``arch`` (build_model's arguments) atomically."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(Path(path), save(state, metadata={"arch": json.dumps(arch)}))


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A zoo model rebuilt from its safetensors file, in eval mode."""
    meta, state = read_safetensors(path, "model", "a .safetensors file written by `efrap attack`")
    if "arch" not in meta:
        raise ModelError(
            f"model: {path} has no 'arch' metadata; load it with your own model class and load_state_dict"
        )
    arch = json.loads(meta["arch"])
    model = build_model(**arch)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"model: {path} does not match architecture {arch} ({exc})") from None
    return model.eval(), arch
