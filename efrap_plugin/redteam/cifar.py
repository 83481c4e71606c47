"""CIFAR-10 from a local copy of the standard python batches, unpickled through an allow-list: a batch
file is untrusted input, and an ordinary unpickler would run whatever code it names."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..data import labeled
from ..errors import DataError
from .datasets import Splits

__all__ = ["load_cifar10"]


class _CifarUnpickler(pickle.Unpickler):
    """Only what a CIFAR-10 batch needs: a dict of bytes, lists and numpy arrays. No code runs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise DataError(
            f"CIFAR-10 batch refers to {module}.{name}: refused. A CIFAR-10 python batch holds only "
            "arrays and lists; this file may be malicious or not a CIFAR-10 batch."
        )


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: not a readable CIFAR-10 python batch ({exc})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict with b'data' and b'labels', got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{path}: expected keys 'data' and 'labels', got {sorted(batch)}")
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be N x 3072 uint8, got shape {data.shape}")
    return data.reshape(-1, 3, 32, 32), np.asarray(batch["labels"], dtype=np.int64)


def load_cifar10(root: str | Path) -> Splits:
    """CIFAR-10 from a local folder of the standard python batches (data_batch_1..5, test_batch)."""
    root = Path(root)
    train_files = sorted(root.glob("data_batch_*"))
    test_file = root / "test_batch"
    if not train_files or not test_file.is_file():
        raise DataError(
            f"CIFAR-10: expected data_batch_1..5 and test_batch in {root} (the 'python version' "
            "archive, extracted); found none. Pass the cifar-10-batches-py folder."
        )
    parts = [_load_cifar_batch(p) for p in train_files]
    x_tr = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _load_cifar_batch(test_file)
    return Splits(labeled(x_tr, y_tr, 10), labeled(x_te.astype(np.float32) / 255.0, y_te, 10), "cifar10")
