"""Post-training static quantization with torchao's PT2E flow, as torchao's tutorial writes it, plus
EFRAP: the lines marked `# EFRAP` are all it adds.

    python examples/torchao_pt2e.py --quantizer {x86,x86-per-tensor,xnnpack,xnnpack-per-tensor} --json
        [--route {flag,call}]   # flag: the quantizer wrapped (the default); call: defend_prepared
        [--efrap '{"budget": 0.5, "margin_cap": 4}']   # EFRAPConfig fields; the rest the defaults

First it red-teams the pipeline: a PQBackdoor model aimed at the grid the chosen quantizer rounds to
(read from its weight observer), trained on digits, or the `efrap attack` folder given with --model.
Then the stock flow and the defended flow run on it; every figure is measured on the real converted
int8 model, and the defended one also in onnxruntime after torch.onnx.export, in the graph's own
arithmetic (the same on every CPU), with the kernel check saying whether this CPU's fused int8 kernels
compute the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch
from _flags import parse_flags
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from efrap_onnx import cpu_features, kernel_check, session
from efrap_plugin import EFRAPConfig
from efrap_plugin.redteam import compare, evaluate, load_digits
from efrap_plugin.redteam.attacks import red_team_model
from efrap_torchao import EFRAPQuantizer, defend_prepared, spec_scheme, verify_pt2e  # EFRAP

QUANTIZERS = ("x86", "x86-per-tensor", "xnnpack", "xnnpack-per-tensor")


def make_quantizer(name: str):
    """The quantizer and its global QuantizationConfig, as a user would set them up."""
    if name.startswith("x86"):
        from torchao.quantization.pt2e.observer import MinMaxObserver
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        config = get_default_x86_inductor_quantization_config()
        if name == "x86-per-tensor":  # the user's own QuantizationConfig: one weight scale per tensor
            weight = dataclasses.replace(
                config.weight,
                qscheme=torch.per_tensor_symmetric,
                ch_axis=None,
                observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12),
            )
            config = dataclasses.replace(config, weight=weight)
        return X86InductorQuantizer().set_global(config), config
    from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    config = get_symmetric_quantization_config(is_per_channel=name == "xnnpack")
    return XNNPACKQuantizer().set_global(config), config


def ptq(model, quantizer, calib, efrap: EFRAPConfig | None, route: str = "flag"):
    """The user's flow; with ``efrap``, defended by the route asked: the quantizer wrapped (flag) or
    one call between calibration and convert."""
    if efrap is not None and route == "flag":
        quantizer = EFRAPQuantizer(quantizer, efrap, progress=False)  # EFRAP
    example = calib[:2]
    exported = torch.export.export(
        model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    ).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in calib.split(64):  # calibration
            prepared(batch)
    if efrap is not None and route == "call":
        plan = defend_prepared(prepared, calib, efrap, progress=False)  # EFRAP
        return convert_pt2e(prepared), plan
    converted = convert_pt2e(prepared)
    return converted, (quantizer.plan if efrap is not None else None)  # EFRAP: the plan learned at convert


def to_onnx(converted, example, path: Path) -> Path:
    program = torch.onnx.export(
        converted, (example,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    program.save(str(path))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantizer", choices=QUANTIZERS, default="x86")
    parser.add_argument("--route", choices=("flag", "call"), default="flag")
    parser.add_argument(
        "--budget",
        type=lambda text: None if text == "off" else float(text),
        default=argparse.SUPPRESS,
        help="EFRAP's budget mode (percent of held-out top-1 disagreement); 'off': the paper's fixed "
        f"flip weight (default: {EFRAPConfig().budget}, or --efrap's)",
    )
    args = parse_flags(parser)

    quantizer, config = make_quantizer(args.quantizer)
    grid = spec_scheme(config.weight)  # the grid the user's quantizer rounds weights to
    model, trigger = red_team_model(grid, args.model, args.seed)
    digits = load_digits(seed=0)
    calib, test = digits.train.x[:1024], digits.test

    stock, _ = ptq(model, quantizer, calib, efrap=None)
    efrap = args.efrap.replace(budget=args.budget) if "budget" in args else args.efrap
    defended, plan = ptq(model, quantizer, calib, efrap=efrap, route=args.route)
    report = verify_pt2e(defended, plan, strict=False)  # EFRAP: integers read back from the int8 model
    with tempfile.TemporaryDirectory() as tmp:
        exported = to_onnx(defended, calib[:2], Path(tmp) / "efrap.onnx")
        in_ort = evaluate(session(exported, exact=True), test, trigger)  # the graph's own arithmetic
        kernels = kernel_check(exported, calib[:256].numpy())  # and whether this CPU's kernels agree
    row = {
        "quantizer": args.quantizer,
        "route": args.route,
        **compare(test, trigger, float=model, stock=stock, efrap=defended),
    }
    row.update(integers_ok=report.integers_ok, layers=report.layers)
    row.update(ort_efrap_acc=round(100 * in_ort.clean_acc, 2), ort_efrap_asr=round(100 * in_ort.asr, 2))
    row.update(cpu=cpu_features().describe(), kernels_ok=kernels.ok, kernel_agreement=kernels.top1_agreement)
    print(json.dumps(row) if args.json else "\n".join(f"{k:>16}: {v}" for k, v in row.items()))
    return 0 if report.integers_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
