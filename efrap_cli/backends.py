"""The backend adapters, imported on demand: a missing extra is one clear line, not an ImportError."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import numpy as np

from efrap_plugin import EFRAPError

__all__ = ["adapter", "stock_onnx_int8"]

_PACKAGES = {"onnx": "efrap_onnx", "torchao": "efrap_torchao", "brevitas": "efrap_brevitas"}


def adapter(extra: str) -> ModuleType:
    """The adapter package of ``extra`` ('onnx', 'torchao' or 'brevitas')."""
    try:
        return importlib.import_module(_PACKAGES[extra])
    except ImportError as exc:
        raise EFRAPError(
            f"the {extra} extra is not installed ({exc}); run `pip install 'efrap-plugin[{extra}]'`"
        ) from None


def stock_onnx_int8(float_onnx: Path, calib: np.ndarray, out: Path, bits: int = 8, per_channel: bool = True):
    """onnxruntime's stock quantize_static: QDQ, per-channel, MinMax, uint8 activations."""
    adapter("onnx").quantize_images(
        float_onnx, out, calib, bits, per_channel=per_channel, efrap=False, progress=False
    )
    return out
