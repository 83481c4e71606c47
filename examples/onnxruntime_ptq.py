"""A user's onnxruntime post-training quantization script, as onnxruntime's own examples write it, with
EFRAP: the changed lines are marked `# EFRAP`. Three routes (``--route``):

- ``drop-in`` (the default): ``efrap_onnx.quantize_static`` instead of onnxruntime's, same arguments;
- ``flag``: onnxruntime's own config object, ``StaticQuantConfig(..., extra_options={"EFRAP": True})``,
  through ``efrap_onnx.quantize`` (a config file can switch EFRAP on and off);
- ``stock-onnxruntime``: the user's own ``onnxruntime.quantization.quantize_static``, unchanged but for the
  model it reads and the extra options ``efrap_onnx.snap`` returns.

    python examples/onnxruntime_ptq.py --json [--route flag]
    python examples/onnxruntime_ptq.py --model tests/fixtures/pqbackdoor-ort8 --route stock-onnxruntime --json

Without ``--model`` the model is a small transformer encoder over N x T x D token inputs (each digits row
a token; the Linear layers export as MatMul + Add), trained briefly here: no attack is planted, and the
figures are the int8 models' top-1 agreement with the float model on held-out inputs, their accuracy, and
whether the defended file holds the plan's integers. With ``--model`` (an `efrap attack` folder: its
model.onnx and attack.json), the attacked classifier's clean accuracy and attack success, float, stock
int8 and defended, in percent, on the digits test split.
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
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, StaticQuantConfig
from onnxruntime.quantization import quantize_static as stock_quantize_static

from efrap_onnx import (
    cpu_features,
    quantize,  # EFRAP: onnxruntime's quantize(model, out, StaticQuantConfig) with the EFRAP key
    quantize_static,  # EFRAP: instead of onnxruntime.quantization's
    snap,  # EFRAP: the pre-pass for onnxruntime's own quantize_static
    verify,
)
from efrap_plugin import LabeledData
from efrap_plugin.redteam import PatchTrigger, TokenEncoder, load_digits, train

ROUTES = ("drop-in", "flag", "stock-onnxruntime")


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


def predictions(path: Path, inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})[0].argmax(axis=1)


class ArrayReader(TokenReader):
    """Calibration batches for a graph's one input, whatever its name."""

    def __init__(self, name: str, inputs: np.ndarray, batch_size: int = 64) -> None:
        super().__init__(inputs, batch_size)
        self.name = name

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = super().get_next()
        return None if item is None else {self.name: item["tokens"]}


def quantize_defended(route: str, float_path: Path, out: Path, reader, options: dict):
    """The int8 model at ``out`` by ``route``; the plan EFRAP learned. ``reader()`` makes a fresh reader."""
    if route == "drop-in":
        return quantize_static(float_path, out, reader(), **options, progress=False)
    if route == "flag":
        config = StaticQuantConfig(reader(), **options, extra_options={"EFRAP": True})  # EFRAP: the key
        return quantize(float_path, out, config, progress=False)
    snapped = out.with_name("snapped.onnx")
    plan, extra = snap(float_path, snapped, reader(), **options, progress=False)  # EFRAP: the pre-pass
    stock_quantize_static(str(snapped), str(out), reader(), **options, extra_options=extra)
    return plan


def encoder_row(route: str, epochs: int, options: dict) -> dict:
    """The transformer encoder: trained here, quantized stock and by ``route``; agreement and accuracy."""
    digits = load_digits(seed=0)
    rows = lambda x: x.reshape(x.shape[0], 8, 8)  # noqa: E731  (N x 1 x 8 x 8 -> N x T x D)
    torch.manual_seed(0)
    model = TokenEncoder()
    train(model, LabeledData(rows(digits.train.x), digits.train.y, 10), epochs, 3e-3, progress=False)
    calib = rows(digits.train.x[:512]).numpy()
    held_out, labels = rows(digits.test.x).numpy(), digits.test.y.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        float_path = export(model, torch.from_numpy(calib[:2]), Path(tmp) / "encoder.onnx")
        stock_quantize_static(str(float_path), str(Path(tmp) / "stock.onnx"), TokenReader(calib), **options)
        plan = quantize_defended(
            route, float_path, Path(tmp) / "efrap.onnx", lambda: TokenReader(calib), options
        )
        report = verify(Path(tmp) / "efrap.onnx", plan)
        ref = predictions(float_path, held_out)
        stock, efrap = (
            predictions(Path(tmp) / "stock.onnx", held_out),
            predictions(Path(tmp) / "efrap.onnx", held_out),
        )
    pct = lambda a, b: round(100 * float((a == b).mean()), 2)  # noqa: E731
    return {
        "route": route,
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


def attacked_row(route: str, folder: Path, options: dict) -> dict:
    """An attacked classifier (an `efrap attack` folder): accuracy and attack success, float, stock, EFRAP."""
    trigger = PatchTrigger.from_dict(json.loads((folder / "attack.json").read_text())["trigger"])
    digits = load_digits(seed=0)
    calib = digits.train.x[:1024].numpy()
    x, y = digits.test.x, digits.test.y.numpy()
    triggered, victims = trigger.apply(x).numpy(), y != trigger.target
    float_path = folder / "model.onnx"
    name = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    with tempfile.TemporaryDirectory() as tmp:
        stock_quantize_static(
            str(float_path), str(Path(tmp) / "stock.onnx"), ArrayReader(name, calib), **options
        )
        plan = quantize_defended(
            route, float_path, Path(tmp) / "efrap.onnx", lambda: ArrayReader(name, calib), options
        )
        report = verify(Path(tmp) / "efrap.onnx", plan, float_model=float_path)
        row = {"route": route}
        for key, path in (
            ("float", float_path),
            ("stock", Path(tmp) / "stock.onnx"),
            ("efrap", Path(tmp) / "efrap.onnx"),
        ):
            row[f"{key}_acc"] = round(100 * float((predictions(path, x.numpy()) == y).mean()), 2)
            hits = predictions(path, triggered)[victims] == trigger.target
            row[f"{key}_asr"] = round(100 * float(hits.mean()), 2)
    # measured in onnxruntime's fused kernels on this CPU (efrap_onnx.check_kernels says whether they
    # compute what the graph says here)
    return {**row, "integers_ok": report.integers_ok, "cpu": cpu_features().describe()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--route", choices=ROUTES, default="drop-in")
    parser.add_argument("--model", type=Path, help="an `efrap attack` folder (model.onnx, attack.json)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    options = {
        "quant_format": QuantFormat.QDQ,
        "per_channel": True,
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
    }
    if args.model is not None:
        row = attacked_row(args.route, args.model, options)
    else:
        row = encoder_row(args.route, args.epochs, options)
    print(json.dumps(row) if args.json else "\n".join(f"{k:>16}: {v}" for k, v in row.items()))
    return 0 if row["integers_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
