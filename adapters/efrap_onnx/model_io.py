"""Loading untrusted ONNX files safely, and writing them atomically."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from efrap_plugin import ModelError, atomic_write

__all__ = ["load_onnx", "save_onnx", "initializer_array"]

log = logging.getLogger(__name__)


def load_onnx(path: str | Path, check_finite: bool = True) -> onnx.ModelProto:
    """Parse ``path`` without following external data first; refuse data outside the model's folder."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model: {path} does not exist; pass the path of a float .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(
            f"model: {path} is not a readable ONNX protobuf ({type(exc).__name__}: {exc})"
        ) from None
    if not model.graph.node:
        raise ModelError(f"model: {path} parsed but holds no graph nodes; is it really an ONNX model?")
    folder = path.resolve().parent
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or os.path.isabs(location) or folder not in target.parents:
            raise ModelError(
                f"model: initializer {tensor.name!r} points at external data {location!r} outside the model's "
                f"folder {folder}; refusing to read it (path traversal). Keep external data next to the model."
            )
        if not target.is_file():
            raise ModelError(
                f"model: external data file {location!r} of {tensor.name!r} is missing in {folder}"
            )
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        onnx.load_external_data_for_model(model, str(folder))
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(f"model: {path} fails the ONNX checker ({exc})") from None
    if check_finite:
        for tensor in model.graph.initializer:
            arr = initializer_array(tensor)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise ModelError(
                    f"model: initializer {tensor.name!r} holds NaN or Inf values; fix the model before quantizing"
                )
    return model


def initializer_array(tensor: onnx.TensorProto) -> np.ndarray:
    arr = numpy_helper.to_array(tensor)
    if arr.dtype.name in ("int4", "uint4"):
        arr = arr.astype(np.int8 if arr.dtype.name == "int4" else np.uint8)
    return arr


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    """Serialise then rename into place: a failure never leaves a half-written model."""
    return atomic_write(Path(path), model.SerializeToString())


def temp_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="efrap-onnx-")
