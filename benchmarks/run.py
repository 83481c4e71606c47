"""Benchmarks: attack x bits cells on the real onnxruntime backend, the fast-vs-reference defense
speed ratio, and int8 latency ratios. Results go to CSV + Markdown with the command that made them.

    python benchmarks/run.py --out benchmarks/results [--only cells,speed,latency,fashion] [--defense-seeds 3]

Fashion-MNIST attacks want a GPU; `benchmarks/sweep.py` trains them there and measures them here.
"""

from __future__ import annotations

import argparse
import csv
import logging
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from efrap_onnx import export_float_onnx, quantize_images, session
from efrap_plugin import EFRAPConfig, evaluate, load_dataset, load_digits
from efrap_plugin.attacks import run_attack

CELLS = [
    ("pqbackdoor", 8),
    ("pqbackdoor", 4),
    ("compartifact", 8),
    ("compartifact", 4),
    ("qu-anti-zation", 8),
    ("qu-anti-zation", 4),
]


def _quantize(src, out, calib, bits, config=None, efrap=True):
    return quantize_images(src, out, calib, bits, efrap=efrap, config=config, progress=False)


def _pct(values):
    m = 100 * statistics.mean(values)
    s = 100 * statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{m:.2f} ± {s:.2f}"


def bench_cells(out: Path, seeds: int, dataset: str = "digits", cells=CELLS) -> list[dict]:
    digits = load_dataset(dataset)
    calib = np.ascontiguousarray(digits.train.x[:1024].numpy())
    rows = []
    for attack, bits in cells:
        t0 = time.perf_counter()
        result, _, _ = run_attack(attack, dataset, "onnxruntime", bits, seed=0, progress=False)
        attack_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            src = export_float_onnx(result.model, digits.train.x[:2], Path(tmp) / "f.onnx")
            f = evaluate(session(src), digits.test, result.trigger)
            _quantize(src, Path(tmp) / "stock.onnx", calib, bits, efrap=False)
            stock = evaluate(session(Path(tmp) / "stock.onnx"), digits.test, result.trigger)
            variants = {}
            for objective in ("efrap", "flip_only", "preserve_only"):
                accs, asrs, secs = [], [], []
                for seed in range(seeds if objective == "efrap" else 1):
                    t0 = time.perf_counter()
                    cfg = EFRAPConfig(objective=objective, seed=1005 + seed)
                    _quantize(src, Path(tmp) / "d.onnx", calib, bits, cfg)
                    secs.append(time.perf_counter() - t0)
                    m = evaluate(session(Path(tmp) / "d.onnx"), digits.test, result.trigger)
                    accs.append(m.clean_acc)
                    asrs.append(m.asr)
                variants[objective] = (accs, asrs, secs)
        acc, asr_, secs = variants["efrap"]
        row = {
            "attack": attack,
            "bits": bits,
            "float_acc": f"{100 * f.clean_acc:.2f}",
            "float_asr": f"{100 * f.asr:.2f}",
            "stock_acc": f"{100 * stock.clean_acc:.2f}",
            "stock_asr": f"{100 * stock.asr:.2f}",
            "efrap_acc": _pct(acc),
            "efrap_asr": _pct(asr_),
            "flip_only_acc": _pct(variants["flip_only"][0]),
            "flip_only_asr": _pct(variants["flip_only"][1]),
            "preserve_only_acc": _pct(variants["preserve_only"][0]),
            "preserve_only_asr": _pct(variants["preserve_only"][1]),
            "attack_met": f.asr <= 0.10 and f.clean_acc >= 0.95 and stock.asr >= 0.90,
            "defense_met": max(asr_) <= 0.03 and min(acc) >= f.clean_acc - 0.01,
            "attack_s": f"{attack_s:.0f}",
            "defense_s": f"{statistics.mean(secs):.1f}",
        }
        logging.info("%s", row)
        rows.append(row)
    name = "cells" if dataset == "digits" else f"cells-{dataset}"
    note = f"{dataset}; EFRAP over {seeds} defense seeds (1005..), attack seed 0; percentages, mean ± spread"
    _write(out, name, rows, note)
    return rows


def _pqbackdoor8_onnx(tmp: Path):
    """The digits PQBackdoor int8 model (the demo's), its float ONNX export, the data and 1,024 calibration images."""
    digits = load_digits()
    result, _, _ = run_attack("pqbackdoor", "digits", "onnxruntime", 8, seed=0, progress=False)
    src = export_float_onnx(result.model, digits.train.x[:2], tmp / "f.onnx")
    return result, src, digits, np.ascontiguousarray(digits.train.x[:1024].numpy())


def bench_speed(out: Path) -> list[dict]:
    """The fast default against the paper's reference setting (10,000 steps/layer), same model, same run."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        result, src, digits, calib = _pqbackdoor8_onnx(Path(tmp))
        for name, cfg in (
            ("default", EFRAPConfig()),
            ("reference", EFRAPConfig.reference()),
            ("reference-objective-fast", EFRAPConfig(balance="reference", lr=1e-3)),
        ):
            t0 = time.perf_counter()
            _quantize(src, Path(tmp) / "d.onnx", calib, 8, cfg)
            secs = time.perf_counter() - t0
            m = evaluate(session(Path(tmp) / "d.onnx"), digits.test, result.trigger)
            rows.append(
                {
                    "config": name,
                    "iters_per_layer": cfg.iters,
                    "lr": cfg.lr,
                    "balance": cfg.balance,
                    "seconds": f"{secs:.1f}",
                    "clean_acc": f"{100 * m.clean_acc:.2f}",
                    "asr": f"{100 * m.asr:.2f}",
                }
            )
    base = float(rows[1]["seconds"])
    for r in rows:
        r["time_vs_reference"] = f"{float(r['seconds']) / base:.3f}"
    _write(out, "speed", rows, "PQBackdoor int8 digits model; times measured in the same run")
    return rows


def bench_latency(out: Path, repeats: int = 200) -> list[dict]:
    """onnxruntime latency of the defended int8 model against the stock int8 and the float model."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        result, src, digits, calib = _pqbackdoor8_onnx(Path(tmp))
        _quantize(src, Path(tmp) / "stock.onnx", calib, 8, efrap=False)
        _quantize(src, Path(tmp) / "efrap.onnx", calib, 8, EFRAPConfig())
        sessions = {k: session(Path(tmp) / f"{k}.onnx") for k in ("f", "stock", "efrap")}
        for batch in (1, 256):
            x = calib[:batch]
            timings = {k: [] for k in sessions}
            for _ in range(repeats):  # interleaved, so that machine noise hits every model alike
                for k, sess in sessions.items():
                    t0 = time.perf_counter()
                    sess.run(None, {"input": x})
                    timings[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e6 for k, v in timings.items()}
            rows.append(
                {
                    "batch": batch,
                    "float_us": f"{med['f']:.0f}",
                    "stock_int8_us": f"{med['stock']:.0f}",
                    "efrap_int8_us": f"{med['efrap']:.0f}",
                    "efrap_vs_stock": f"{med['efrap'] / med['stock']:.3f}",
                    "efrap_vs_float": f"{med['efrap'] / med['f']:.3f}",
                }
            )
    _write(out, "latency", rows, f"median of {repeats} interleaved runs, default CPU session options")
    return rows


def _write(out: Path, name: str, rows: list[dict], note: str, command: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cols = list(rows[0])
    md = [
        f"# {name}",
        "",
        f"Command: `{command or shlex.join(['python', *sys.argv])}`",
        "",
        note,
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--only", default="cells,speed,latency")
    parser.add_argument("--defense-seeds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("efrap_onnx", "efrap_plugin", "onnxruntime", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    out = Path(args.out)
    jobs = {
        "cells": lambda: bench_cells(out, args.defense_seeds),
        "speed": lambda: bench_speed(out),
        "latency": lambda: bench_latency(out),
        "fashion": lambda: bench_cells(out, 1, "fashion-mnist", [("pqbackdoor", 8), ("pqbackdoor", 4)]),
    }
    for name in args.only.split(","):
        t0 = time.perf_counter()
        jobs[name]()
        logging.getLogger("bench").warning("%s done in %.0f s", name, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
