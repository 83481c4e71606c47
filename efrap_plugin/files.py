"""Writing outputs atomically and reading safetensors files: the library's only file I/O helpers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .errors import ModelError

__all__ = ["atomic_write", "read_safetensors"]


def atomic_write(path: Path, data: bytes) -> Path:
    """Write to a temporary name in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_safetensors(
    path: str | Path, what: str, hint: str
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Header metadata and tensors of a safetensors file; ``what``/``hint`` shape the error messages."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what}: {path} does not exist; pass {hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ModelError(f"{what}: {path} is not a readable safetensors file ({exc})") from None
