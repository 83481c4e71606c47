"""Benchmarks: attack x bits cells on the real onnxruntime backend, the fast-vs-reference defense
speed ratio, and int8 latency ratios. Results go to CSV + Markdown with the command that made them.

    python benchmarks/run.py --out benchmarks/results [--only cells,speed,latency,fashion]
        [--attack-seeds 3] [--defense-seeds 1] [--procs 2]

Fashion-MNIST attacks want a GPU; `benchmarks/sweep.py` trains them there and measures them here.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from efrap_cli.report import write_table
from efrap_onnx import export_float_onnx, quantize_images, session
from efrap_plugin import EFRAPConfig
from efrap_plugin.redteam import REMOVAL_BARS, attack_fires, backdoor_removed, evaluate, load_dataset
from efrap_plugin.redteam.attacks import run_attack

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


def attacked_onnx(
    tmp: Path, attack: str = "pqbackdoor", bits: int = 8, seed: int = 0, dataset: str = "digits"
):
    """An attacked model (by default the demo's digits PQBackdoor int8), its float ONNX export, the data,
    1,024 calibration images and the attack's seconds (clean training included)."""
    data = load_dataset(dataset)
    t0 = time.perf_counter()
    result, _, _ = run_attack(attack, dataset, "onnxruntime", bits, seed=seed, progress=False)
    attack_s = time.perf_counter() - t0
    src = export_float_onnx(result.model, data.train.x[:2], tmp / "f.onnx")
    return result, src, data, np.ascontiguousarray(data.train.x[:1024].numpy()), attack_s


def _cell_seed(job: tuple[str, int, int, int, str]) -> dict:
    """One attack x bits x attack seed: the attack, then float / stock / EFRAP and its ablations in onnxruntime."""
    attack, bits, seed, defense_seeds, dataset = job
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result, src, data, calib, attack_s = attacked_onnx(Path(tmp), attack, bits, seed, dataset)
        row = {"attack": attack, "bits": bits, "attack_seed": seed, "attack_s": attack_s}
        row["float"] = evaluate(session(src), data.test, result.trigger)
        _quantize(src, Path(tmp) / "stock.onnx", calib, bits, efrap=False)
        row["stock"] = evaluate(session(Path(tmp) / "stock.onnx"), data.test, result.trigger)
        for objective in ("efrap", "flip_only", "preserve_only"):
            runs, secs = [], []
            for k in range(defense_seeds if objective == "efrap" else 1):
                t1 = time.perf_counter()
                _quantize(
                    src,
                    Path(tmp) / "d.onnx",
                    calib,
                    bits,
                    EFRAPConfig(budget=None, objective=objective, seed=1005 + k),
                )
                secs.append(time.perf_counter() - t1)
                runs.append(evaluate(session(Path(tmp) / "d.onnx"), data.test, result.trigger))
            row[objective] = runs
            row[f"{objective}_s"] = statistics.mean(secs)
    logging.info("%s %d-bit seed %d done", attack, bits, seed)
    return row


def _met(row: dict) -> tuple[bool, bool, bool]:
    """Attack fired; defense met the 3% / 1-point bar; EFRAP met the project's bar (no more asr than the
    float model's + 1 point); every EFRAP seed must meet it."""
    f, stock, runs = row["float"], row["stock"], row["efrap"]
    fired = attack_fires(f, stock)
    return (
        fired,
        fired and all(backdoor_removed(f, m, asr_cap=REMOVAL_BARS["asr_floor"]) for m in runs),
        fired and all(backdoor_removed(f, m) for m in runs),
    )


def _seed_row(row: dict) -> dict:
    attack_met, defense_met, le_float = _met(row)
    out = {"attack": row["attack"], "bits": row["bits"], "attack_seed": row["attack_seed"]}
    for key in ("float", "stock"):
        out[f"{key}_acc / asr"] = f"{100 * row[key].clean_acc:.2f} / {100 * row[key].asr:.2f}"
    for key in ("efrap", "flip_only", "preserve_only"):
        runs = row[key]
        out[f"{key}_acc / asr"] = f"{_pct([m.clean_acc for m in runs])} / {_pct([m.asr for m in runs])}"
    out.update(attack_met=attack_met, defense_met=defense_met, efrap_le_float=le_float)
    return out


def _cell_row(rows: list[dict]) -> dict:
    """Mean ± spread over attack seeds; the *_met columns count seeds."""
    mets = [_met(r) for r in rows]
    fired = sum(m[0] for m in mets)
    out = {"attack": rows[0]["attack"], "bits": rows[0]["bits"], "attack_seeds": len(rows)}
    for key in ("float", "stock", "efrap", "flip_only", "preserve_only"):
        runs = [m for r in rows for m in (r[key] if isinstance(r[key], list) else [r[key]])]
        out[f"{key}_acc"] = _pct([m.clean_acc for m in runs])
        out[f"{key}_asr"] = _pct([m.asr for m in runs])
    out["efrap_minus_float_asr"] = _pct(
        [statistics.mean(m.asr for m in r["efrap"]) - r["float"].asr for r in rows]
    )
    out["attack_met"] = f"{fired}/{len(rows)}"
    out["defense_met"] = f"{sum(m[1] for m in mets)}/{fired}"
    out["efrap_le_float"] = f"{sum(m[2] for m in mets)}/{fired}"
    out["attack_s"] = f"{statistics.mean(r['attack_s'] for r in rows):.0f}"
    out["defense_s"] = f"{statistics.mean(r['efrap_s'] for r in rows):.1f}"
    return out


def bench_cells(
    out: Path,
    attack_seeds: int,
    defense_seeds: int,
    dataset: str = "digits",
    cells=CELLS,
    procs: int = 1,
) -> list[dict]:
    """Every attack x bits cell over ``attack_seeds`` attacked models, in parallel processes."""
    jobs = [(a, b, s, defense_seeds, dataset) for a, b in cells for s in range(attack_seeds)]
    with get_context("spawn").Pool(procs, initializer=configure_logging) as pool:
        done = pool.map(_cell_seed, jobs, chunksize=1)
    suffix = "" if dataset == "digits" else f"-{dataset}"
    seeds_note = (
        f"{dataset}; attack seeds 0..{attack_seeds - 1}, EFRAP defense seeds 1005..{1004 + defense_seeds}; "
        "onnxruntime sessions; percentages, mean ± spread. attack_met: float asr <= 10%, float acc >= 95%, "
        "stock asr >= 90%. defense_met: EFRAP asr <= 3% and acc at most 1 point below float. "
        "efrap_le_float: EFRAP asr <= max(3%, the float model's own asr + 1 point), same accuracy bar."
    )
    write_table(out, f"cells{suffix}-per-seed", [_seed_row(r) for r in done], seeds_note)
    rows = [_cell_row([r for r in done if (r["attack"], r["bits"]) == cell]) for cell in cells]
    write_table(
        out, f"cells{suffix}", rows, seeds_note + " Counts are seeds; per-seed rows in the -per-seed file."
    )
    return rows


SPEED_CONFIGS = {
    "default": EFRAPConfig(),
    "reference": EFRAPConfig.reference(),
    "reference-objective-fast": EFRAPConfig(budget=None, balance="reference", lr=1e-3),
}
SPEED_CELLS = [("pqbackdoor", 8), ("pqbackdoor", 4), ("compartifact", 4), ("qu-anti-zation", 4)]


def _speed_cell(cell: tuple[str, int]) -> list[dict]:
    """One attacked digits model (seed 0): each config timed in the same process, measured in onnxruntime."""
    attack, bits = cell
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        result, src, digits, calib, _ = attacked_onnx(Path(tmp), attack, bits)
        f = evaluate(session(src), digits.test, result.trigger)
        for name, cfg in SPEED_CONFIGS.items():
            t0 = time.perf_counter()
            _quantize(src, Path(tmp) / "d.onnx", calib, bits, cfg)
            secs = time.perf_counter() - t0
            m = evaluate(session(Path(tmp) / "d.onnx"), digits.test, result.trigger)
            rows.append(
                {
                    "attack": attack,
                    "bits": bits,
                    "float_acc / asr": f"{100 * f.clean_acc:.2f} / {100 * f.asr:.2f}",
                    "config": name,
                    "iters_per_layer": cfg.iters,
                    "lr": cfg.lr,
                    "balance": cfg.balance,
                    "seconds": secs,
                    "clean_acc": f"{100 * m.clean_acc:.2f}",
                    "asr": f"{100 * m.asr:.2f}",
                }
            )
    base = next(r["seconds"] for r in rows if r["config"] == "reference")
    for r in rows:
        r["time_vs_reference"] = f"{r['seconds'] / base:.3f}"
        r["seconds"] = f"{r['seconds']:.1f}"
    logging.info("speed: %s %d-bit done", attack, bits)
    return rows


def bench_speed(out: Path, procs: int = 1) -> list[dict]:
    """The fast default against the paper's reference setting (10,000 steps/layer) on every digits cell
    whose attack fires; each ratio is taken within one process."""
    with get_context("spawn").Pool(procs, initializer=configure_logging) as pool:
        rows = [r for cell_rows in pool.map(_speed_cell, SPEED_CELLS, chunksize=1) for r in cell_rows]
    note = (
        "Digits models attacked with seed 0, EFRAP seed 1005, onnxruntime sessions; percentages. "
        "time_vs_reference: seconds over the reference config's seconds on the same model, same process."
    )
    write_table(out, "speed", rows, note)
    return rows


def bench_latency(out: Path, repeats: int = 200) -> list[dict]:
    """onnxruntime latency of the defended int8 model against the stock int8 and the float model."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        result, src, digits, calib, _ = attacked_onnx(Path(tmp))
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
    write_table(out, "latency", rows, f"median of {repeats} interleaved runs, default CPU session options")
    return rows


def configure_logging() -> None:
    """Progress lines from this script only (also in the worker processes)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("efrap_onnx", "efrap_plugin", "onnxruntime", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--only", default="cells,speed,latency")
    parser.add_argument("--attack-seeds", type=int, default=3)
    parser.add_argument("--defense-seeds", type=int, default=1)
    parser.add_argument(
        "--cells", default=",".join(f"{a}:{b}" for a, b in CELLS), help="attack:bits,... (digits cells)"
    )
    parser.add_argument("--procs", type=int, default=2, help="parallel attack x seed jobs")
    args = parser.parse_args()
    configure_logging()
    torch.set_num_threads(1)
    cells = [(a, int(b)) for a, b in (c.split(":") for c in args.cells.split(","))]
    out = Path(args.out)
    jobs = {
        "cells": lambda: bench_cells(
            out, args.attack_seeds, args.defense_seeds, cells=cells, procs=args.procs
        ),
        "speed": lambda: bench_speed(out, args.procs),
        "latency": lambda: bench_latency(out),
        "fashion": lambda: bench_cells(
            out, 1, 1, "fashion-mnist", [("pqbackdoor", 8), ("pqbackdoor", 4)], procs=args.procs
        ),
    }
    for name in args.only.split(","):
        t0 = time.perf_counter()
        jobs[name]()
        logging.getLogger("bench").warning("%s done in %.0f s", name, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
