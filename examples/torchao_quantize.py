"""torchao's ``quantize_(model, config)``, as torchao's README writes it, plus EFRAP: the line marked
`# EFRAP` is the one it changes.

    python examples/torchao_quantize.py --config {int8-weight-only,int8-dynamic,intx-int4-g32} --json
        [--model tests/fixtures/pqbackdoor-torchao-int8-mlp] [--efrap '{"budget": 1}']

It red-teams the pipeline first: a PQBackdoor model (Linear layers only, what the configs quantize)
aimed at the grid the chosen config rounds to, trained on digits, or the `efrap attack` folder given with
--model. Every figure is measured on the real quantized model (torchao's tensor subclasses and kernels
on this CPU); the defended model's integers are read back from its quantized weights.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from _flags import parse_flags
from torchao.quantization import (
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    quantize_,
)
from torchao.quantization.granularity import PerGroup

import efrap_torchao  # EFRAP
from efrap_plugin.redteam import compare, load_digits
from efrap_plugin.redteam.attacks import red_team_model

CONFIGS = {
    "int8-weight-only": lambda: Int8WeightOnlyConfig(),
    "int8-dynamic": lambda: Int8DynamicActivationInt8WeightConfig(),
    "intx-int4-g32": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
}
MLP = {"name": "digits-mlp", "in_channels": 1, "num_classes": 10, "width": 256}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="int8-weight-only")
    args = parse_flags(parser)

    grid, _ = efrap_torchao.quantize_scheme(CONFIGS[args.config]())  # the grid the config rounds to
    model, trigger = red_team_model(grid, args.model, args.seed, arch=MLP)
    digits = load_digits(seed=0)
    calib, test = digits.train.x[:1024], digits.test

    stock = copy.deepcopy(model).eval()
    quantize_(stock, CONFIGS[args.config]())
    defended = copy.deepcopy(model).eval()
    plan = efrap_torchao.quantize_(
        defended, CONFIGS[args.config](), calib, args.efrap, progress=False
    )  # EFRAP
    report = efrap_torchao.verify_quantize(defended, plan, strict=False)  # integers read back

    row = {"config": args.config, **compare(test, trigger, float=model, stock=stock, efrap=defended)}
    row.update(integers_ok=report.integers_ok, layers=report.layers)
    print(json.dumps(row) if args.json else "\n".join(f"{k:>12}: {v}" for k, v in row.items()))
    return 0 if report.integers_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
