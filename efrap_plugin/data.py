"""The conversion of user data into calibration / evaluation tensors.

Images are float32 N x C x H x W in [0, 1]; triggers are pasted in that space, before any
normalisation a model does inside itself. Nothing here downloads anything.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError
from .npz import read_npz_arrays

__all__ = ["LabeledData", "as_calibration", "as_labeled", "labeled", "load_npz", "load_npz_inputs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabeledData:
    """Inputs (images, or any N x ... batch: tokens, sequences) and integer labels of one split.
    Triggers need images; training and clean accuracy take any input the model takes."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        _check_images(self.x, "x", images=False)
        if self.y.dim() != 1 or self.y.shape[0] != self.x.shape[0]:
            raise DataError(
                f"y: expected {self.x.shape[0]} labels (one per image), got shape {tuple(self.y.shape)}"
            )
        if self.y.numel() and (int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes):
            raise DataError(
                f"y: labels must lie in 0..{self.num_classes - 1} (the model's classes), "
                f"got {int(self.y.min())}..{int(self.y.max())}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, n: int, seed: int = 0) -> LabeledData:
        """A seeded random subset of n items (all of them if n >= len)."""
        if n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return LabeledData(self.x[idx], self.y[idx], self.num_classes)


def load_npz(
    path: str | Path, num_classes: int | None = None, rows: int | None = None, images: bool = True
) -> LabeledData | torch.Tensor:
    """An .npz with images in ``x`` (N x C x H x W float32) and optional labels in ``y``; with
    ``images=False`` (calibration data) ``x`` may be any batch of inputs, N x ....

    Only ``x`` and ``y`` are read, and only their first ``rows`` rows: other arrays are never inflated.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected an .npz with an array named 'x'")
    arrays, available = read_npz_arrays(path, ("x", "y"), rows)
    if "x" not in arrays:
        raise DataError(f"{path}: expected an array named 'x' (N x C x H x W float32), found {available}")
    x = _to_images(arrays["x"], f"{path}:x", images)
    if "y" not in arrays:
        return x
    y_arr = arrays["y"]
    if y_arr.dtype.kind not in "iu" or y_arr.shape != (x.shape[0],):
        raise DataError(
            f"{path}:y: expected one integer label per image ({x.shape[0]}), got {y_arr.dtype} {y_arr.shape}"
        )
    y = torch.as_tensor(y_arr.astype(np.int64))
    classes = num_classes if num_classes is not None else int(y.max()) + 1 if y.numel() else 1
    return LabeledData(x, y, classes)


def load_npz_inputs(path: str | Path, names: Sequence[str], rows: int | None = None) -> dict[str, np.ndarray]:
    """Calibration inputs of a model with several inputs: the arrays of an .npz named as the model's
    inputs, each cut to its first ``rows`` rows, all with the same number of rows and finite."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: no such file; expected an .npz with one array per model input {list(names)}"
        )
    arrays, available = read_npz_arrays(path, tuple(names), rows)
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(
            f"{path}: the model takes inputs {list(names)}; the archive lacks {missing} (it holds {available}). "
            "Save one array per input, named as the input: np.savez(path, **{name: array})"
        )
    counts = {n: a.shape[0] if a.ndim else 0 for n, a in arrays.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise DataError(f"{path}: every input needs the same number of rows (> 0), got {counts}")
    for n, a in arrays.items():
        if a.dtype.kind not in "fiub":
            raise DataError(f"{path}:{n}: expected a numeric array, got {a.dtype}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise DataError(f"{path}:{n}: holds NaN or Inf values")
    return {n: arrays[n] for n in names}


def as_calibration(
    data: Any, n: int | None = None, sample_shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Unlabeled calibration images from a tensor, array, LabeledData, .npz path, or iterable of batches.

    A batch may be a tensor or a (x, y, ...) tuple / list; labels are dropped.
    """
    if isinstance(data, LabeledData):
        x = data.x
    elif isinstance(data, (str, Path)):
        loaded = load_npz(data, rows=n if n is not None and n > 0 else None, images=False)
        x = loaded.x if isinstance(loaded, LabeledData) else loaded
    elif isinstance(data, (torch.Tensor, np.ndarray)):
        x = _to_inputs(data, "calibration data")
    elif isinstance(data, Iterable):
        batches = _read_batches(data, n)
        if not batches:
            raise DataError("calibration data: the iterable yielded no batches; pass at least one image")
        shapes = {tuple(b.shape[1:]) for b in batches}
        if len(shapes) != 1:
            raise DataError(f"calibration data: batches must share one sample shape, got {sorted(shapes)}")
        x = torch.cat(batches)
    else:
        raise DataError(
            "calibration data: expected a tensor / array (N x C x H x W), an .npz path, a LabeledData, "
            f"a DataLoader or an iterable of batches, got {type(data).__name__}"
        )
    x = _to_inputs(x, "calibration data")
    if sample_shape is not None and tuple(x.shape[1:]) != tuple(sample_shape):
        raise DataError(
            f"calibration data: images of shape {tuple(x.shape[1:])} do not match the model input "
            f"{tuple(sample_shape)}; pass N x {' x '.join(map(str, sample_shape))} images"
        )
    if n is not None:
        if n <= 0:
            raise DataError(f"calibration size: expected a positive number of images, got {n}")
        x = x[:n]
    return x


def _read_batches(data: Iterable, n: int | None) -> list[torch.Tensor]:
    """The iterable's batches, read only until ``n`` rows are in hand (a DataLoader over a large set, or
    an endless generator, is not pulled in whole)."""
    batches: list[torch.Tensor] = []
    rows = 0
    for batch in data:
        batches.append(_first(batch))
        rows += len(batches[-1]) if batches[-1].dim() else 1
        if n is not None and n > 0 and rows >= n:
            break
    return batches


def as_labeled(data: Any, num_classes: int | None = None) -> LabeledData:
    """Labeled evaluation data from LabeledData, (x, y), an .npz path, or an iterable of (x, y) batches."""
    if isinstance(data, LabeledData):
        out = data
    elif isinstance(data, (str, Path)):
        loaded = load_npz(data, num_classes)
        if not isinstance(loaded, LabeledData):
            raise DataError(f"{data}: evaluation needs labels in an array named 'y' next to 'x'")
        out = loaded
    elif isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], tuple):
        x, y = _to_images(data[0], "x"), torch.as_tensor(np.asarray(data[1])).long()
        out = LabeledData(x, y, num_classes or (int(y.max()) + 1 if y.numel() else 1))
    elif isinstance(data, Iterable):
        xs, ys = [], []
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise DataError("evaluation data: each batch must be an (images, labels) pair")
            xs.append(_to_images(batch[0], "images"))
            ys.append(torch.as_tensor(np.asarray(batch[1])).long())
        if not xs:
            raise DataError("evaluation data: the iterable yielded no batches")
        y = torch.cat(ys)
        out = LabeledData(torch.cat(xs), y, num_classes or int(y.max()) + 1)
    else:
        raise DataError(
            f"evaluation data: expected LabeledData, (x, y), an .npz path or (x, y) batches, got {type(data).__name__}"
        )
    if num_classes is not None and out.num_classes != num_classes:
        out = LabeledData(out.x, out.y, num_classes)
    if len(out) == 0:
        raise DataError("evaluation data: empty; pass at least one labeled image")
    return out


def _first(batch: Any) -> torch.Tensor:
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError("calibration data: got an empty batch tuple")
        batch = batch[0]
    return _to_inputs(batch, "calibration batch")


def _to_inputs(x: Any, what: str) -> torch.Tensor:
    """Calibration inputs of any shape a model takes: N x D, N x T x D, N x C x L, images."""
    return _to_images(x, what, images=False)


def _to_images(x: Any, what: str, images: bool = True) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biufc":  # strings, bytes, records, dates, Python objects
            raise DataError(f"{what}: expected a numeric array, got dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x)).reshape(x.shape)  # a 0-d array stays 0-d
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{what}: expected a tensor or numpy array, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise DataError(f"{what}: a {x.layout} tensor; pass a dense one (x.to_dense())")
    if x.is_meta:
        raise DataError(f"{what}: a tensor on the meta device holds no values; pass the data itself")
    # token ids (N x T, N x K x T) stay as they are; a 4-D integer batch is raw images, refused below
    token_ids = not images and x.dtype in (torch.int32, torch.int64) and x.dim() <= 3
    if not token_ids and not torch.is_floating_point(x):
        raise DataError(
            f"{what}: expected float images scaled to [0, 1], got dtype {x.dtype}; divide by 255 and cast to float32"
        )
    _check_images(x, what, images)
    return x if token_ids else x.to(torch.float32)


def _check_images(x: torch.Tensor, what: str, images: bool = True) -> None:
    if images and x.dim() != 4:
        raise DataError(f"{what}: expected N x C x H x W images (4 dimensions), got shape {tuple(x.shape)}")
    if x.dim() < 2:
        raise DataError(
            f"{what}: expected a batch of inputs, N x ... (N x D, N x T x D, N x C x L or N x C x H x W), "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise DataError(f"{what}: empty (0 images); pass at least one image")
    if not torch.isfinite(x).all():
        raise DataError(f"{what}: contains NaN or Inf values")


def labeled(x: np.ndarray, y: np.ndarray, classes: int) -> LabeledData:
    """Arrays as LabeledData: float32 inputs, int64 labels."""
    return LabeledData(
        torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)), classes
    )
