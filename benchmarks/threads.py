"""What one thread for small work buys on a shared 2-core machine: EFRAP's defense of the digits
fixture and a short digits training, idle and beside two busy processes, with the one-thread rule
(efrap_plugin.threads) on and off (off: torch's own thread count, 2 here).

    python benchmarks/threads.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

import efrap_plugin.threads as threads
from efrap_cli.report import write_table
from efrap_plugin import EFRAPConfig, defend
from efrap_plugin.redteam import DigitsCNN, load_digits, load_model, train

ROOT = Path(__file__).resolve().parents[1]
BUSY = "while True: pass"


def _defend() -> None:
    model = load_model(ROOT / "tests" / "fixtures" / "pqbackdoor-ort8" / "model.safetensors")[0]
    defend(
        model, load_digits(seed=0).train.x, "onnxruntime", EFRAPConfig(budget=None, iters=300), progress=False
    )


def _train() -> None:
    torch.manual_seed(0)
    train(DigitsCNN(width=16), load_digits(seed=0).train, epochs=15, batch_size=64, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    _defend(), _train()  # warm-up: imports, data, first kernels
    rows = []
    for load in ("idle", "two busy processes"):
        spinners = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2 if load != "idle" else 0)]
        try:
            for rule in ("on", "off"):
                threads.SMALL_WORK_FLOPS = 1e9 if rule == "on" else 0.0
                for task, run in (
                    ("defend (digits fixture, 300 steps/layer)", _defend),
                    ("train (DigitsCNN, 15 epochs)", _train),
                ):
                    start = time.perf_counter()
                    run()
                    rows.append(
                        {
                            "task": task,
                            "machine": load,
                            "one_thread_rule": rule,
                            "seconds": round(time.perf_counter() - start, 1),
                        }
                    )
                    print(rows[-1], flush=True)
        finally:
            for p in spinners:
                p.kill()
    note = (
        "2-core CPU, torch.set_num_threads(2). 'on': work under 1e9 FLOPs per step runs on one thread "
        "(the default); 'off': torch's own count. The better of two runs each, after a warm-up. Compare within a row pair (same load, same run)."
    )
    write_table(args.out, "threads", rows, note)


if __name__ == "__main__":
    main()
