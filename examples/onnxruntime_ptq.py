"""A user's onnxruntime post-training quantization script, as onnxruntime's own examples write it, with
EFRAP: the one changed line is marked `# EFRAP`.

    python examples/onnxruntime_ptq.py --json

The model is a small transformer encoder over N x T x D token inputs (each digits row a token; the
Linear layers export as MatMul + Add); it is trained briefly here, exported to ONNX, and quantized with
a CalibrationDataReader over the tokens. No attack is planted: the figures are the int8 models' top-1
agreement with the float model on held-out inputs (stock and EFRAP), their accuracy, and whether the
defended file holds the plan's integers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
from onnxruntime.quantization import quantize_static as stock_quantize_static

from efrap_onnx import (
    quantize_static,  # EFRAP: instead of onnxruntime.quantization's
    verify,
)
from efrap_plugin import LabeledData
from efrap_plugin.redteam import TokenEncoder, load_digits, train


class TokenReader(CalibrationDataReader):
    """Calibration batches of N x T x D tokens, fed to the graph's input 'tokens'."""

    def __init__(self, tokens: np.ndarray, batch_size: int = 64) -> None:
        self.batches = [tokens[i : i + batch_size] for i in range(0, len(tokens), batch_size)]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {"tokens": self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


def export(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model.eval(), (example,), input_names=["tokens"], dynamo=True, dynamic_shapes=({0: batch},)
    )
    program.save(str(path))
    return path


def predictions(path: Path, tokens: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"tokens": tokens})[0].argmax(axis=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)

    digits = load_digits(seed=0)
    rows = lambda x: x.reshape(x.shape[0], 8, 8)  # noqa: E731  (N x 1 x 8 x 8 -> N x T x D)
    torch.manual_seed(0)
    model = TokenEncoder()
    train(model, LabeledData(rows(digits.train.x), digits.train.y, 10), args.epochs, 3e-3, progress=False)
    calib = rows(digits.train.x[:512]).numpy()
    held_out, labels = rows(digits.test.x).numpy(), digits.test.y.numpy()
    options = {
        "quant_format": QuantFormat.QDQ,
        "per_channel": True,
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
    }
    with tempfile.TemporaryDirectory() as tmp:
        float_path = export(model, torch.from_numpy(calib[:2]), Path(tmp) / "encoder.onnx")
        stock_quantize_static(str(float_path), str(Path(tmp) / "stock.onnx"), TokenReader(calib), **options)
        plan = quantize_static(
            float_path, Path(tmp) / "efrap.onnx", TokenReader(calib), **options, progress=False
        )
        report = verify(Path(tmp) / "efrap.onnx", plan)
        ref = predictions(float_path, held_out)
        stock, efrap = (
            predictions(Path(tmp) / "stock.onnx", held_out),
            predictions(Path(tmp) / "efrap.onnx", held_out),
        )
    pct = lambda a, b: round(100 * float((a == b).mean()), 2)  # noqa: E731
    row = {
        "float_acc": pct(ref, labels),
        "stock_acc": pct(stock, labels),
        "efrap_acc": pct(efrap, labels),
        "stock_agreement": pct(stock, ref),
        "efrap_agreement": pct(efrap, ref),
        "integers_ok": report.integers_ok,
        "layers": report.layers,
        "skipped": sorted(plan.meta.skipped),
        "constants": len(report.constants),  # biases added, norm scales: read back, no layer's weight
    }
    print(json.dumps(row) if args.json else "\n".join(f"{k:>16}: {v}" for k, v in row.items()))
    return 0 if report.integers_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
