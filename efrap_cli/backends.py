"""The backend adapters, imported on demand: a missing extra is one clear line, not an ImportError."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from efrap_plugin import EFRAPConfig, EFRAPError, inputs_needed
from efrap_plugin.redteam import Splits, load_model

__all__ = ["CALIB_IMAGES", "adapter", "stock_onnx_int8", "stock_runner"]

CALIB_IMAGES = inputs_needed(EFRAPConfig())
"""Calibration images every stock flow here uses: what the default defense reads (budget mode's held-out
images included), so the rows compare."""

_PACKAGES = {"onnx": "efrap_onnx", "torchao": "efrap_torchao", "brevitas": "efrap_brevitas"}


def adapter(extra: str) -> ModuleType:
    """The adapter package of ``extra`` ('onnx', 'torchao' or 'brevitas')."""
    try:
        return importlib.import_module(_PACKAGES[extra])
    except ImportError as exc:
        raise EFRAPError(
            f"the {extra} extra is not installed ({exc}); run `pip install 'efrap-plugin[{extra}]'`"
        ) from None


def stock_onnx_int8(
    float_onnx: Any,
    calib: np.ndarray,
    out: Path,
    bits: int = 8,
    per_channel: bool = True,
    reduce_range: bool = False,
):
    """onnxruntime's stock quantize_static: QDQ, per-channel, MinMax, uint8 activations; ``float_onnx``
    a path or the onnx adapter's ``prepare`` of one."""
    adapter("onnx").quantize_images(
        float_onnx,
        out,
        calib,
        bits,
        per_channel=per_channel,
        reduce_range=reduce_range,
        efrap=False,
        progress=False,
    )
    return out


def _torch_model(path: Path, scheme: str, bits: int):
    if path.suffix != ".safetensors" or bits != 8:
        raise EFRAPError(
            f"--scheme {scheme}: this backend quantizes a torch model to int8; pass the .safetensors model "
            "and --bits 8"
        )
    return load_model(path)[0]


def _nearest_onnxruntime(path: Path, splits: Splits, tmp: Path, bits: int) -> tuple[Any, str, Path | None]:
    onnx = adapter("onnx")
    float_onnx = path
    if path.suffix == ".safetensors":
        float_onnx = onnx.export_float_onnx(load_model(path)[0], splits.train.x[:2], tmp / "float.onnx")
    calib = splits.train.x[:CALIB_IMAGES].numpy()
    stock = stock_onnx_int8(float_onnx, calib, tmp / "q.onnx", bits)
    return onnx.session(stock), f"onnxruntime int{bits} nearest (stock quantize_static)", stock


def _nearest_torchao(path: Path, splits: Splits, tmp: Path, bits: int) -> tuple[Any, str, Path | None]:
    model = _torch_model(path, "torchao-x86", bits)
    converted = adapter("torchao").quantize_pt2e(model, splits.train.x[:CALIB_IMAGES])
    return converted, "torchao PT2E int8 nearest (X86InductorQuantizer, convert_pt2e)", None


def _nearest_brevitas(path: Path, splits: Splits, tmp: Path, bits: int) -> tuple[Any, str, Path | None]:
    brevitas = adapter("brevitas")
    quantized = brevitas.quantize_brevitas(
        _torch_model(path, "brevitas-int8", bits), splits.train.x[:CALIB_IMAGES]
    )
    qcdq = brevitas.export_qcdq(quantized, splits.train.x[:2], tmp / "qcdq.onnx")
    return adapter("onnx").session(qcdq), "Brevitas int8 nearest, QCDQ export run in onnxruntime", qcdq


_STOCK = {
    "onnxruntime": _nearest_onnxruntime,
    "torchao-x86": _nearest_torchao,
    "brevitas-int8": _nearest_brevitas,
}


def stock_runner(
    scheme: str, path: Path, splits: Splits, tmp: Path, bits: int
) -> tuple[Any, str, Path | None]:
    """The model at ``path`` through ``scheme``'s stock round-to-nearest flow, a label saying so, and the
    ONNX file onnxruntime runs (None where the backend is torch)."""
    if scheme not in _STOCK:
        raise EFRAPError(
            f"--scheme {scheme}: real-backend evaluation covers {', '.join(_STOCK)}; the paper's reference "
            "scheme has no backend"
        )
    return _STOCK[scheme](path, splits, tmp, bits)
