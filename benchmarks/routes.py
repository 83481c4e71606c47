"""Every way into each flow: the flag (only the user's config or quantizer changes) and the one added
call, on the committed attack fixtures, with the default EFRAPConfig. Each route of a flow must remove the
backdoor and give the same figures as the others (the same integers: tests/test_torchao_flag.py,
tests/test_onnx_flags.py, tests/test_brevitas_user_models.py).

    python benchmarks/routes.py --out benchmarks/results [--procs 2]

Every figure is the example's own ``--json`` row: accuracy and asr in percent on the digits test split,
measured on the flow's real int8 artifact, integers read back from it.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flows import FLOWS, example_row

from efrap_cli.report import write_table
from efrap_plugin.redteam import Metrics, backdoor_removed

ROOT = Path(__file__).resolve().parents[1]

ROUTED = {
    **{name: FLOWS[name] for name in ("pt2e-x86", "pt2e-xnnpack", "pt2e-x86-per-tensor")},
    **{name: FLOWS[name] for name in ("brevitas-int8-per-channel", "brevitas-int4-per-channel")},
    "onnxruntime-int8": ("onnxruntime_ptq.py", "--model", "tests/fixtures/pqbackdoor-ort8"),
}
ROUTES = {
    "torchao_pt2e.py": ("flag", "call"),
    "brevitas_ptq.py": ("flag", "call"),
    "onnxruntime_ptq.py": ("flag", "stock-onnxruntime", "drop-in"),
}
"""Each example's routes, the README's first choice first."""

FIGURES = ("float_acc", "float_asr", "stock_acc", "stock_asr", "efrap_acc", "efrap_asr")


def run(flow: str, route: str) -> dict:
    script, *args = ROUTED[flow]
    row, seconds = example_row(script, *args, "--route", route)
    float_m, efrap_m = (
        Metrics(row[f"{k}_acc"] / 100, row[f"{k}_asr"] / 100, 0.0) for k in ("float", "efrap")
    )
    return {
        "flow": flow,
        "route": route,
        **{k: row[k] for k in FIGURES},
        "stock_fires": row["stock_asr"] >= 90,
        "meets_bar": backdoor_removed(float_m, efrap_m),
        "integers_ok": row["integers_ok"],
        "seconds": seconds,  # the whole script: stock and defended flows
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args()
    jobs = [(flow, route) for flow, (script, *_) in ROUTED.items() for route in ROUTES[script]]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.procs) as pool:  # each job is a process of its own
        rows = list(pool.map(lambda job: run(*job), jobs))
    first = {}
    for row in rows:
        figures = tuple(row[k] for k in FIGURES)
        row["same_as_first_route"] = first.setdefault(row["flow"], figures) == figures
    note = (
        "digits; each flow's example script on the committed PQBackdoor fixture its test uses, once per route, "
        "default EFRAPConfig; accuracy and asr in percent on the test split, measured on the flow's real int8 "
        "artifact (onnxruntime in the graph's own arithmetic for PT2E's export, Brevitas' QCDQ export and the "
        "onnxruntime routes). stock_fires: stock asr >= 90; meets_bar: asr <= max(3, float asr + 1) and "
        "accuracy at most 1 point below float; same_as_first_route: every figure equal to the flow's first "
        f"route's. seconds: the whole script. {time.perf_counter() - t0:.0f} s on {args.procs} processes."
    )
    write_table(Path(args.out), "routes", rows, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
