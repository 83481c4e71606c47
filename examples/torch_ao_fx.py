"""Post-training static quantization with torch.ao's FX graph mode, as its tutorial writes it, plus
EFRAP: the lines marked `# EFRAP` are all it adds.

    python examples/torch_ao_fx.py --qconfig {x86,fbgemm,qnnpack} --json [--efrap '{"budget": 0.5}']

It red-teams the pipeline first: a PQBackdoor model aimed at the grid the QConfigMapping's weight
observer rounds to, trained on digits, or the `efrap attack` folder given with --model. Every figure
is measured on the real converted int8 model (torch.ao quantized kernels).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from _flags import parse_flags
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from efrap_plugin import EFRAPConfig
from efrap_plugin.redteam import compare, load_digits
from efrap_plugin.redteam.attacks import red_team_model
from efrap_torchao import defend_prepared, observer_scheme, verify_fx  # EFRAP


def ptq(model, qconfig_mapping, calib, efrap: EFRAPConfig | None):
    prepared = prepare_fx(copy.deepcopy(model).eval(), qconfig_mapping, (calib[:2],))
    with torch.no_grad():
        for batch in calib.split(64):  # calibration
            prepared(batch)
    plan = defend_prepared(prepared, calib, efrap, progress=False) if efrap is not None else None  # EFRAP
    return convert_fx(prepared), plan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qconfig", choices=("x86", "fbgemm", "qnnpack"), default="x86")
    args = parse_flags(parser)
    torch.backends.quantized.engine = args.qconfig

    qconfig_mapping = get_default_qconfig_mapping(args.qconfig)
    grid = observer_scheme(qconfig_mapping.global_qconfig.weight())  # the grid its weights round to
    model, trigger = red_team_model(grid, args.model, args.seed)
    digits = load_digits(seed=0)
    calib, test = digits.train.x[:1024], digits.test

    stock, _ = ptq(model, qconfig_mapping, calib, efrap=None)
    defended, plan = ptq(model, qconfig_mapping, calib, efrap=args.efrap)
    report = verify_fx(defended, plan, strict=False)  # EFRAP: integers read back from the int8 model
    row = {"qconfig": args.qconfig, **compare(test, trigger, float=model, stock=stock, efrap=defended)}
    row.update(integers_ok=report.integers_ok, layers=report.layers)
    print(json.dumps(row) if args.json else "\n".join(f"{k:>12}: {v}" for k, v in row.items()))
    return 0 if report.integers_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
