"""EFRAP settings through the users' own flows: each example script (torchao PT2E, torch.ao FX and eager,
Brevitas PTQ) run as a user runs it, on the committed attack fixtures its tests use, once per setting.

The digits onnxruntime cells (budget.py) do not speak for every flow: a setting that met the strict bar on
all of them failed three of these (benchmarks/README.md). A candidate default is measured here too.

    python benchmarks/flows.py --out benchmarks/results [--procs 2] [--only fixed,budget-0.5]

Every figure is the example's own ``--json`` row: accuracy and asr on the digits test split, measured on
the flow's real int8 artifact, integers read back from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from budget import bar_counts, by_setting, meets_strict

from efrap_cli.report import write_table
from efrap_plugin.redteam import Metrics, backdoor_removed

ROOT = Path(__file__).resolve().parents[1]

FLOWS = {
    "pt2e-x86": ("torchao_pt2e.py", "--quantizer", "x86", "--model", "tests/fixtures/pqbackdoor-x86"),
    "pt2e-xnnpack": (
        "torchao_pt2e.py",
        "--quantizer",
        "xnnpack",
        "--model",
        "tests/fixtures/pqbackdoor-ort8",
    ),
    "pt2e-x86-per-tensor": (
        "torchao_pt2e.py",
        "--quantizer",
        "x86-per-tensor",
        "--model",
        "tests/fixtures/pqbackdoor-x86-per-tensor",
    ),
    "pt2e-xnnpack-per-tensor": (
        "torchao_pt2e.py",
        "--quantizer",
        "xnnpack-per-tensor",
        "--model",
        "tests/fixtures/pqbackdoor-xnnpack-per-tensor",
    ),
    "fx-x86": ("torch_ao_fx.py", "--qconfig", "x86", "--model", "tests/fixtures/pqbackdoor-x86"),
    "fx-qnnpack": (
        "torch_ao_fx.py",
        "--qconfig",
        "qnnpack",
        "--model",
        "tests/fixtures/pqbackdoor-x86-per-tensor",
    ),
    "eager-x86": ("torch_ao_eager.py",),
    "brevitas-int8-per-channel": (
        "brevitas_ptq.py",
        "--weight-quant",
        "int8-per-channel-float",
        "--model",
        "tests/fixtures/pqbackdoor-ort8",
    ),
    "brevitas-int4-per-channel": (
        "brevitas_ptq.py",
        "--weight-quant",
        "int4-per-channel-float",
        "--model",
        "tests/fixtures/pqbackdoor-brevitas-int4-pc",
    ),
    "brevitas-int8-per-tensor-pot": (
        "brevitas_ptq.py",
        "--weight-quant",
        "int8-per-tensor-fixed-point",
        "--model",
        "tests/fixtures/pqbackdoor-brevitas-int8-pt-pot",
    ),
}
"""Each flow as its test runs it (tests/test_torchao_user_flows.py, tests/test_brevitas_user_models.py)."""

SETTINGS = {
    "fixed": {"budget": None},
    "budget-0.5": {"budget": 0.5},
    "budget-0.5-top-0.8-cap-4": {"budget": 0.5, "max_strength": 0.8, "margin_cap": 4.0},
    "budget-0.5-top-0.7-cap-4": {"budget": 0.5, "max_strength": 0.7, "margin_cap": 4.0},
    "budget-0.5-top-0.8": {"budget": 0.5, "max_strength": 0.8},
    "budget-1-top-0.8": {"budget": 1.0, "max_strength": 0.8},
    "budget-1-top-0.8-last": {"budget": 1.0, "max_strength": 0.8, "holdout_choice": "last"},
}
"""EFRAPConfig fields per setting (the example's --efrap): the paper's fixed strength, budget mode at its
ladder's default top, the margin-capped settings that met the strict bar on every digits cell, and
uncapped budget mode topped at 0.8 with its held-out images nearest the boundaries or the last ones."""


def example_row(script: str, *args: str) -> tuple[dict, float]:
    """An example script's ``--json`` row, run as a user runs it, and the seconds the whole script took."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args, "--json"],
        capture_output=True, text=True, timeout=1200, cwd=ROOT,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"{script} {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), round(time.perf_counter() - t0, 1)


def run(flow: str, setting: str) -> dict:
    script, *args = FLOWS[flow]
    row, seconds = example_row(script, *args, "--efrap", json.dumps(SETTINGS[setting]))
    float_m, efrap_m = (
        Metrics(row[f"{k}_acc"] / 100, row[f"{k}_asr"] / 100, 0.0) for k in ("float", "efrap")
    )
    return {
        "flow": flow,
        "setting": setting,
        "float_acc": row["float_acc"],
        "float_asr": row["float_asr"],
        "stock_asr": row["stock_asr"],
        "efrap_acc": row["efrap_acc"],
        "efrap_asr": row["efrap_asr"],
        "acc_drop": round(row["float_acc"] - row["efrap_acc"], 2),
        "meets_bar": backdoor_removed(float_m, efrap_m),
        "meets_strict": meets_strict(float_m, efrap_m),
        "integers_ok": row["integers_ok"],
        "seconds": seconds,  # the whole script: stock and defended flows
    }


def summary(rows: list[dict]) -> list[dict]:
    return [
        {
            "setting": setting,
            "flows": len(mine),
            **bar_counts(mine),
            "mean_acc_drop": round(statistics.mean(r["acc_drop"] for r in mine), 2),
            "max_acc_drop": round(max(r["acc_drop"] for r in mine), 2),
            "integers_ok": all(r["integers_ok"] for r in mine),
        }
        for setting, mine in by_setting(rows).items()
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--only", default="", help="setting,...: measure only these of SETTINGS")
    parser.add_argument("--name", default="flows")
    args = parser.parse_args()
    only = [s for s in args.only.split(",") if s] or list(SETTINGS)
    unknown = set(only) - set(SETTINGS)
    if unknown:
        raise SystemExit(f"--only: {sorted(unknown)} are not among {sorted(SETTINGS)}")
    jobs = [(flow, setting) for flow in FLOWS for setting in only]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.procs) as pool:  # each job is a process of its own
        rows = list(pool.map(lambda job: run(*job), jobs))
    note = (
        "digits; each flow's example script on the committed PQBackdoor fixture its test uses (eager trains "
        "its own); accuracy and asr in percent on the test split, measured on the flow's real int8 artifact "
        "(torch.ao quantized kernels, or onnxruntime for PT2E and Brevitas' QCDQ export). meets_bar: asr <= "
        "max(3, float asr + 1) and accuracy at most 1 point below float; meets_strict: asr <= max(3, float "
        f"asr), same accuracy. seconds: the whole script. {time.perf_counter() - t0:.0f} s on {args.procs} "
        "processes."
    )
    out = Path(args.out)
    write_table(out, args.name, rows, note)
    write_table(out, f"{args.name}-summary", summary(rows), note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
