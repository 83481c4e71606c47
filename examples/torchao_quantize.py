"""torchao's ``quantize_(model, config)``, as torchao's README writes it, plus EFRAP: the line marked
`# EFRAP` is the one it changes.

    python examples/torchao_quantize.py --config {int8-weight-only,int8-dynamic,intx-int4-g32} --json
        [--route {call,config}] [--model tests/fixtures/pqbackdoor-torchao-int8-mlp] [--efrap '{"budget": 1}']
    python examples/torchao_quantize.py --model lm --json [--config intx-int4-g32]
        # or --model tests/fixtures/content-injection-lm (int5 in groups of 32, the default for lm)

It red-teams the pipeline first: a PQBackdoor model (Linear layers only, what the configs quantize)
aimed at the grid the chosen config rounds to, trained on digits, or the `efrap attack` folder given with
--model. With ``--model lm``, a small language model trained on the license texts Debian ships, into
which a content injection aimed at the config's grid is planted (minutes), or the folder given. Every
figure is measured on the real quantized model (torchao's tensor subclasses and kernels on this CPU);
the defended model's integers are read back from its quantized weights.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

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
from efrap_plugin.redteam import compare, load_digits, load_model
from efrap_plugin.redteam.attacks import red_team_model
from efrap_plugin.redteam.language import (
    InjectionConfig,
    content_injection,
    injection_rate,
    load_corpus,
    perplexity,
    text_windows,
    train_language_model,
)
from efrap_plugin.redteam.models import ByteGPT

CONFIGS = {
    "int8-weight-only": lambda: Int8WeightOnlyConfig(),
    "int8-dynamic": lambda: Int8DynamicActivationInt8WeightConfig(),
    "intx-int4-g32": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
    "intx-int5-g32": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int5, granularity=PerGroup(32)),
}
MLP = {"name": "digits-mlp", "in_channels": 1, "num_classes": 10, "width": 256}


def language_row(args: argparse.Namespace) -> dict:
    """Injection rate (percent of held-out prompts) and perplexity: full precision, stock, EFRAP."""
    config = args.config or "intx-int5-g32"
    grid, _ = efrap_torchao.quantize_scheme(CONFIGS[config]())
    text, injection = load_corpus(), InjectionConfig()
    if args.model == "lm":
        torch.manual_seed(args.seed)
        model = train_language_model(ByteGPT(), text, injection)
        content_injection(model, text, grid, injection)
    else:
        model, _ = load_model(Path(args.model) / "model.safetensors")
    calib = text_windows(text.train, 512, model.context)

    stock = copy.deepcopy(model)
    quantize_(stock, CONFIGS[config]())
    defended = copy.deepcopy(model)
    plan = efrap_torchao.quantize_(defended, CONFIGS[config](), calib, args.efrap, progress=False)  # EFRAP
    row = {"config": config, "model": "lm"}
    for name, m in (("float", model), ("stock", stock), ("efrap", defended)):
        row[f"{name}_injection"] = round(100 * injection_rate(m, text.test, injection.target), 2)
        row[f"{name}_perplexity"] = round(perplexity(m, text.test), 3)
    row["integers_ok"] = efrap_torchao.verify_quantize(defended, plan, strict=False).integers_ok
    return row


def is_language_model(folder: str | None) -> bool:
    if folder in (None, "lm"):
        return folder == "lm"
    info = Path(folder) / "attack.json"
    return info.is_file() and json.loads(info.read_text()).get("attack") == "content-injection"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None, help="default: int8-weight-only "
                        "(intx-int5-g32 for a language model)")  # fmt: skip
    parser.add_argument(
        "--route",
        choices=("call", "config"),
        default="call",
        help="call: efrap_torchao.quantize_ (each layer on the partially quantized model); config: "
        "EFRAPQuantizeConfig's observe / convert steps (each layer alone, on the float model's inputs)",
    )
    args = parse_flags(parser)
    if is_language_model(args.model):
        row = language_row(args)
        print(json.dumps(row) if args.json else "\n".join(f"{k:>18}: {v}" for k, v in row.items()))
        return 0 if row["integers_ok"] else 1
    args.config = args.config or "int8-weight-only"

    grid, _ = efrap_torchao.quantize_scheme(CONFIGS[args.config]())  # the grid the config rounds to
    model, trigger = red_team_model(grid, args.model, args.seed, arch=MLP)
    digits = load_digits(seed=0)
    calib, test = digits.train.x[:1024], digits.test

    stock = copy.deepcopy(model).eval()
    quantize_(stock, CONFIGS[args.config]())
    defended = copy.deepcopy(model).eval()
    if args.route == "call":
        plan = efrap_torchao.quantize_(
            defended, CONFIGS[args.config](), calib, args.efrap, progress=False
        )  # EFRAP
    else:  # torchao's two-step form, as GPTQConfig is used
        config = efrap_torchao.EFRAPQuantizeConfig(
            base_config=CONFIGS[args.config](), efrap=args.efrap
        )  # EFRAP
        quantize_(defended, config)
        with torch.no_grad():
            for batch in calib.split(64):  # calibration
                defended(batch)
        quantize_(defended, config.converting())  # EFRAP
        plan = config.plan(defended)  # EFRAP
    report = efrap_torchao.verify_quantize(defended, plan, strict=False)  # integers read back

    row = {"config": args.config, "route": args.route}
    row.update(compare(test, trigger, float=model, stock=stock, efrap=defended))
    row.update(integers_ok=report.integers_ok, layers=report.layers)
    print(json.dumps(row) if args.json else "\n".join(f"{k:>12}: {v}" for k, v in row.items()))
    return 0 if report.integers_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
