"""EFRAP through torchao's ``quantize_``: the defense on attacked Linear models, the attack it is measured
against, and what it costs per model size.

    python benchmarks/quantize.py --out benchmarks/results [--parts defense,attack,scale] [--device cuda]

defense: ``examples/torchao_quantize.py`` per config on the committed fixture its test uses, by each route
(``call``: ``efrap_torchao.quantize_``; ``config``: ``EFRAPQuantizeConfig``'s two steps); accuracy and
asr in percent on the digits test split, measured on torchao's quantized model, integers read back.
attack: PQBackdoor on the digits MLP aimed at torchao's int8 per-row grid, with and without widening
the rows' grids (``PQBackdoorConfig.widen``), and at int4 in groups of 32; float and stock figures.
language: a content injection into a small language model (``--model lm``), trained here per config.
scale: seconds and peak resident memory of ``efrap_torchao.quantize_`` (default config: 1,000 steps per
layer, 1,024 calibration inputs) on square Linear stacks of growing width, each in its own process,
against torchao's own ``quantize_`` on the same model; randomly initialised (cost does not depend on
training).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from flows import example_row

from efrap_cli.report import write_table

ROOT = Path(__file__).resolve().parents[1]
DEFENSE = {
    "int8-weight-only": "pqbackdoor-torchao-int8-mlp",
    "int8-dynamic": "pqbackdoor-torchao-int8-mlp",
    "intx-int4-g32": "pqbackdoor-torchao-int4-g32-mlp",
}
LANGUAGE = ("intx-int5-g32", "intx-int4-g32")
WIDTHS = (256, 1024, 2048, 4096)
DEPTH = 3


def defense_rows() -> list[dict]:
    rows = []
    for route in ("call", "config"):
        for config, fixture in DEFENSE.items():
            args = ("--config", config, "--model", f"tests/fixtures/{fixture}", "--route", route)
            row, seconds = example_row("torchao_quantize.py", *args)
            rows.append({"fixture": fixture, **row, "seconds": seconds})
    return rows


def language_rows() -> list[dict]:
    """The content injection, trained here for each config (minutes each), then defended."""
    rows = []
    for config in LANGUAGE:
        row, seconds = example_row("torchao_quantize.py", "--model", "lm", "--config", config)
        rows.append({**row, "seconds": seconds})
    return rows


def attack_rows() -> list[dict]:
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization import quantize_ as torchao_quantize_
    from torchao.quantization.granularity import PerGroup

    from efrap_plugin.redteam import evaluate, load_digits
    from efrap_plugin.redteam.attacks.runner import default_config, run_attack
    from efrap_torchao import quantize_scheme

    test = load_digits(seed=0).test
    mlp = {"name": "digits-mlp", "in_channels": 1, "num_classes": 10, "width": 256}
    harder = dataclasses.replace(
        default_config("pqbackdoor", "digits", 0), poison_epochs=15, poison_per_batch=16
    )
    cells = [
        ("int8-per-row", Int8WeightOnlyConfig, {}, 1.0),
        ("int8-per-row", Int8WeightOnlyConfig, {}, 4.0),
        ("int8-per-row", Int8WeightOnlyConfig, {}, 16.0),
        ("int4-g32", IntxWeightOnlyConfig, {"weight_dtype": torch.int4, "granularity": PerGroup(32)}, 1.0),
    ]
    rows = []
    for grid, make, kwargs, widen in cells:
        scheme, _ = quantize_scheme(make(**kwargs))
        config = dataclasses.replace(harder, widen=widen)
        t0 = time.perf_counter()
        result, _, _ = run_attack(
            "pqbackdoor", "digits", scheme, scheme.bits, 0, arch=mlp, config=config, progress=False
        )
        stock = copy.deepcopy(result.model).eval()
        torchao_quantize_(stock, make(**kwargs))
        f, s = evaluate(result.model, test, result.trigger), evaluate(stock, test, result.trigger)
        rows.append({
            "grid": grid, "widen": widen,
            "float_acc": round(100 * f.clean_acc, 2), "float_asr": round(100 * f.asr, 2),
            "stock_acc": round(100 * s.clean_acc, 2), "stock_asr": round(100 * s.asr, 2),
            "seconds": round(time.perf_counter() - t0, 1),
        })  # fmt: skip
    return rows


def _one_size(width: int, device: str) -> dict:
    """In a process of its own: torchao's quantize_ and EFRAP's on a DEPTH-layer stack of ``width``."""
    from torch import nn
    from torchao.quantization import Int8WeightOnlyConfig
    from torchao.quantization import quantize_ as torchao_quantize_

    from efrap_plugin import EFRAPConfig
    from efrap_torchao import quantize_, verify_quantize

    torch.manual_seed(0)
    layers = [m for _ in range(DEPTH) for m in (nn.Linear(width, width), nn.ReLU())]
    model = nn.Sequential(*layers[:-1]).eval()
    calib = torch.randn(1024, width)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stock = copy.deepcopy(model)
    t0 = time.perf_counter()
    torchao_quantize_(stock, Int8WeightOnlyConfig())
    stock_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = quantize_(model, Int8WeightOnlyConfig(), calib, EFRAPConfig(device=device), progress=False)
    efrap_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "width": width, "layers": DEPTH, "weights_m": round(DEPTH * width * width / 1e6, 2), "device": device,
        "torchao_s": round(stock_s, 2), "efrap_s": round(efrap_s, 1), "efrap_per_layer_s": round(efrap_s / DEPTH, 1),
        "peak_rss_mib": round(peak / 1024), "rss_over_start_mib": round((peak - base) / 1024),
        "integers_ok": verify_quantize(model, plan, strict=False).integers_ok,
    }  # fmt: skip


def scale_rows(widths: tuple[int, ...], device: str) -> list[dict]:
    rows = []
    for width in widths:
        out = subprocess.run(
            [sys.executable, __file__, "--one-size", str(width), "--device", device],
            capture_output=True, text=True, timeout=3600, cwd=ROOT,
        )  # fmt: skip
        if out.returncode != 0:
            raise SystemExit(f"width {width} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--parts", default="defense,attack,language,scale")
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    if args.one_size is not None:
        print(json.dumps(_one_size(args.one_size, args.device)))
        return 0
    out, parts = Path(args.out), args.parts.split(",")
    if "defense" in parts:
        note = (
            "digits; examples/torchao_quantize.py per config and route (call: efrap_torchao.quantize_; config: "
            "EFRAPQuantizeConfig's two steps) on its committed fixture (the digits MLP, PQBackdoor aimed at the "
            "config's grid), default EFRAPConfig; accuracy and asr in percent on the test split, "
            "measured on torchao's quantized model; integers_ok: read back from its quantized weights."
        )
        write_table(out, "quantize", defense_rows(), note)
    if "attack" in parts:
        note = (
            "digits MLP (3 Linear layers, width 256), PQBackdoor with 15 poisoning epochs and 16 triggered images "
            "per batch, aimed at torchao's grid; widen: each row's outlier on a never-fired input, x its max "
            "(PQBackdoorConfig.widen); stock: torchao's own quantize_ on the released model."
        )
        write_table(out, "quantize-attack", attack_rows(), note)
    if "language" in parts:
        note = (
            "ByteGPT (2 causal blocks, width 96) trained on /usr/share/common-licenses, a content injection "
            "(efrap_plugin.redteam.language) aimed at each config's grid, then examples/torchao_quantize.py "
            "--model lm: injection, percent of 100 held-out prompts whose greedy 64-byte continuation holds the "
            "target; perplexity per byte on the held-out tenth of the corpus; default EFRAPConfig on 512 "
            "windows of 64 bytes."
        )
        write_table(out, "quantize-language", language_rows(), note)
    if "scale" in parts:
        note = (
            f"{DEPTH} square Linear layers (ReLU between), random weights, 1,024 random calibration inputs; "
            "Int8WeightOnlyConfig; efrap_torchao.quantize_ with the default config (1,000 steps per layer, batch "
            "32) against torchao's own quantize_ on the same model, each width in its own process, one torch "
            f"thread on cpu. peak_rss_mib: the process's peak. Device: {args.device}."
        )
        widths = tuple(int(w) for w in args.widths.split(","))
        write_table(out, "quantize-scale", scale_rows(widths, args.device), note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
