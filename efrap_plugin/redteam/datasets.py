"""The red-team kit's offline datasets: digits (scikit-learn's, shipped with it), Fashion-MNIST
(Debian's dataset-fashion-mnist). Nothing here downloads anything."""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import LabeledData, labeled
from ..errors import DataError

__all__ = ["DATASETS", "FASHION_MNIST_DIR", "Splits", "load_dataset", "load_digits", "load_fashion_mnist"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Splits:
    """A dataset's fixed train / test split."""

    train: LabeledData
    test: LabeledData
    name: str


def load_digits(seed: int = 0, test_size: float = 0.3) -> Splits:
    """scikit-learn's 1,797 real 8x8 digits, split by a seeded stratified shuffle."""
    try:
        from sklearn.datasets import load_digits as sk_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DataError(
            "dataset 'digits' ships with scikit-learn, which is not installed; run "
            "`pip install 'efrap-plugin[redteam]'`"
        ) from None

    bunch = sk_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return Splits(labeled(x_tr, y_tr, 10), labeled(x_te, y_te, 10), "digits")


def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR) -> Splits:
    """Fashion-MNIST from the original gzipped IDX files (Debian: dataset-fashion-mnist)."""
    root = Path(root)
    names = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
    splits = {}
    for split, (img, lab) in names.items():
        img_path, lab_path = _find_idx(root, img), _find_idx(root, lab)
        images = _read_idx(img_path).astype(np.float32)[:, None, :, :] / 255.0
        labels = _read_idx(lab_path).astype(np.int64)
        splits[split] = labeled(images, labels, 10)
    return Splits(splits["train"], splits["test"], "fashion-mnist")


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"Fashion-MNIST: {stem}(.gz) not found in {root}. Install the offline copy with "
        "`apt-get install dataset-fashion-mnist` (or `make fashion-mnist`), or pass the folder that holds it."
    )


def _read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(
            f"{path}: header promises {dims} = {int(np.prod(dims))} bytes, file holds {data.size}"
        )
    return data.reshape(dims)


DATASETS = {"digits": load_digits, "fashion-mnist": load_fashion_mnist}


def load_dataset(name: str, seed: int = 0) -> Splits:
    """A named offline dataset: 'digits' or 'fashion-mnist'."""
    if name == "digits":
        return load_digits(seed=seed)
    if name == "fashion-mnist":
        return load_fashion_mnist()
    raise DataError(f"dataset: expected one of {sorted(DATASETS)} (--dataset), got {name!r}")
