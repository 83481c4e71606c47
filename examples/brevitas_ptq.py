"""Post-training quantization with Brevitas' graph flow, as Brevitas' PTQ examples write it, plus EFRAP:
the lines marked `# EFRAP` are all it adds, by either route (``--route``): ``call``, one call after
calibration (``defend_quant_model``), or ``flag``, Brevitas' algorithm-context form (``efrap_mode``
beside ``calibration_mode``, learning from the inputs the calibration loop feeds).

    python examples/brevitas_ptq.py --weight-quant \
        {int8-per-channel-float,int8-per-tensor-fixed-point,int4-per-channel-float} --json \
        [--route flag] [--efrap '{"budget": 0.5}']

First it red-teams the pipeline: a PQBackdoor model aimed at the grid the chosen weight quantizer
rounds to (read from the quantizer), trained on digits, or the `efrap attack` folder given with
--model. Then the stock flow and the defended flow run on it (preprocess_for_quantize, quantize with
the chosen quantizers, calibration_mode, export_onnx_qcdq); every figure is measured in onnxruntime on
the exported QCDQ file, in the graph's own arithmetic (the same on every CPU), and the defended file's
integers are read back and checked. The kernel check says whether this CPU's fused int8 kernels compute
the same; where they do not (8-bit weights on CPUs without VNNI), the kernels' figures are added.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
from _flags import parse_flags
from brevitas.export import export_onnx_qcdq
from brevitas.graph.calibrate import calibration_mode
from brevitas.graph.quantize import COMPUTE_LAYER_MAP, preprocess_for_quantize, quantize
from brevitas.quant import Int8WeightPerChannelFloat, Int8WeightPerTensorFixedPoint
from torch import nn

from efrap_brevitas import defend_quant_model, efrap_mode, quantizer_scheme, verify_qcdq  # EFRAP
from efrap_onnx import cpu_features, kernel_check, session
from efrap_plugin.redteam import compare, load_digits
from efrap_plugin.redteam.attacks import red_team_model

WEIGHT_QUANT = {
    "int8-per-channel-float": (Int8WeightPerChannelFloat, {}),
    "int8-per-tensor-fixed-point": (Int8WeightPerTensorFixedPoint, {}),
    "int4-per-channel-float": (Int8WeightPerChannelFloat, {"weight_bit_width": 4}),
}


def quantize_model(model: nn.Module, weight_quant, options: dict) -> nn.Module:
    """Brevitas' graph quantization with the chosen weight quantizer on every Conv and Linear."""
    layer_map = dict(COMPUTE_LAYER_MAP)
    for float_cls in (nn.Conv2d, nn.Linear):
        quant_cls, kwargs = layer_map[float_cls]
        layer_map[float_cls] = (quant_cls, {**kwargs, "weight_quant": weight_quant, **options})
    return quantize(preprocess_for_quantize(copy.deepcopy(model).eval()), compute_layer_map=layer_map)


def calibrate(calib: torch.Tensor, model: nn.Module) -> None:
    with torch.no_grad(), calibration_mode(model):
        for batch in calib.split(64):
            model(batch)


def export(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    export_onnx_qcdq(
        model,
        args=example,
        export_path=str(path),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weight-quant", choices=tuple(WEIGHT_QUANT), default="int8-per-channel-float")
    parser.add_argument("--route", choices=("call", "flag"), default="call")
    args = parse_flags(parser)

    weight_quant, options = WEIGHT_QUANT[args.weight_quant]
    grid = quantizer_scheme(weight_quant, **options)  # the grid the user's quantizer rounds weights to
    model, trigger = red_team_model(grid, args.model, args.seed)
    digits = load_digits(seed=0)
    calib, test = digits.train.x[:1024], digits.test

    stock = quantize_model(model, weight_quant, options)
    calibrate(calib, stock)
    defended = quantize_model(model, weight_quant, options)
    if args.route == "call":
        calibrate(calib, defended)
        plan = defend_quant_model(defended, calib, args.efrap, progress=False)  # EFRAP
    else:
        with (
            torch.no_grad(),
            efrap_mode(defended, args.efrap, progress=False) as efrap,
            calibration_mode(defended),
        ):
            for batch in calib.split(64):  # EFRAP: efrap_mode opened first, left last
                defended(batch)
        plan = efrap.plan
    with tempfile.TemporaryDirectory() as tmp:
        stock_file = export(stock.eval(), calib[:1], Path(tmp) / "stock.onnx")
        efrap_file = export(defended.eval(), calib[:1], Path(tmp) / "efrap.onnx")
        report = verify_qcdq(efrap_file, plan, defended, strict=False)  # EFRAP: integers read back
        exact = {"stock": session(stock_file, exact=True), "efrap": session(efrap_file, exact=True)}
        row = {"weight_quant": args.weight_quant, "route": args.route}
        row.update(compare(test, trigger, float=model, **exact))
        checks = {
            k: kernel_check(f, calib[:256].numpy()) for k, f in (("stock", stock_file), ("efrap", efrap_file))
        }
        row.update(cpu=cpu_features().describe(), kernels_ok=all(c.ok for c in checks.values()))
        if not row["kernels_ok"]:  # what this CPU's fused kernels make of the same files
            fused = {f"kernels_{k}": session(f) for k, f in (("stock", stock_file), ("efrap", efrap_file))}
            row.update(compare(test, trigger, **fused))
    row.update(integers_ok=report.integers_ok, layers=report.layers)
    print(json.dumps(row) if args.json else "\n".join(f"{k:>16}: {v}" for k, v in row.items()))
    return 0 if report.integers_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
