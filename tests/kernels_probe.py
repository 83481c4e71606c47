"""Run efrap_onnx's kernel check in a process of its own, as `qemu-x86_64 -cpu Haswell python
tests/kernels_probe.py CALIB.npy ROWS MODEL.onnx ...` does on an AVX2-only CPU model: the check module is
loaded by path (it imports only onnx, onnxruntime and numpy), so the emulated process starts quickly.
Prints one JSON line: each model's KernelCheck.to_dict()."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

KERNELS = Path(__file__).resolve().parents[1] / "adapters" / "efrap_onnx" / "kernels.py"


def main(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("efrap_kernels_probe", KERNELS)
    kernels = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = kernels  # dataclasses look their module up
    spec.loader.exec_module(kernels)
    calib, rows, models = np.load(argv[0]), int(argv[1]), argv[2:]
    checks = {Path(m).name: kernels.check_kernels(m, calib[:rows]).to_dict() for m in models}
    print(json.dumps(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
