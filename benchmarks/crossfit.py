"""How well can any choice of EFRAP's strength be measured at digits' scale? Each firing digits cell's test
split is cut in two fixed halves (270 images each); every defended model is measured on each half, and each
rule that chooses among them is scored cross-fitted: chosen on one half, measured on the other, the two
directions pooled, so every test image is measured once by a model chosen without it.

    python benchmarks/crossfit.py --out benchmarks/results [--cells pqbackdoor:8,...] [--procs 2]

Runs per cell: the fixed default; budget mode as it ships (budget 1, top 0.8, held-out training images
nearest the float model's boundaries); one strength for every layer (``budget.UNIFORM_STRENGTHS``, as
``--study uniform`` runs them); and budget mode measured on images the model never trained on (one test half,
unlabeled, held out; the run is scored on the other half only). Rules: ``oracle-in-sample`` (the uniform
study's oracle: each cell's lowest asr within 1 point of float accuracy, picked with the labels and the
trigger of the very images it is scored on), ``oracle-cross-fitted`` (the same pick made on one half,
scored on the other), ``validation-labels`` (the strongest uniform strength within 1 point of float accuracy
on one labeled half, no trigger: a user with a labeled validation set), ``unseen-disagreement-B`` (the
strongest uniform strength whose top-1 disagreement with the float model on one unlabeled half is within B
points: no labels, no trigger, images the model never trained on), ``unseen-budget-B`` and the runs as they
are. ``half_gap``: the largest difference, over the cell's runs, between one model's accuracy drop
measured on the two halves: the measurement's own noise at this scale.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from budget import UNIFORM_STRENGTHS, meets_strict
from run import CELLS, attacked_onnx, configure_logging

from efrap_cli.report import write_table
from efrap_onnx import quantize_images, session
from efrap_plugin import EFRAPConfig, LabeledData
from efrap_plugin.redteam import Metrics, attack_fires, backdoor_removed, evaluate, predict

CALIBRATION = 1280
"""Training images handed to every run (all 1,257 on digits); fixed runs read the first 1,024."""
UNSEEN_BUDGETS = (0.5,)
"""Budgets of budget mode measured on a test half the model never trained on (top 0.8, no margin cap)."""
HALVES = 2
UNSEEN_DISAGREEMENTS = (0.5, 1.0, 2.0)
"""Label-free global rules: the strongest uniform strength whose top-1 disagreement with the float model on
one unlabeled half stays within this many points, scored on the other half."""


def runs() -> dict[str, EFRAPConfig]:
    """The defended models measured on both halves of every cell."""
    out = {
        "default": EFRAPConfig(),
        "budget-1-top-0.8": EFRAPConfig(budget=1.0, max_strength=0.8, margin_cap=None),
    }
    for s in UNIFORM_STRENGTHS:
        out[f"uniform-{s:g}"] = EFRAPConfig(budget=100.0, max_strength=s, margin_cap=None)
    return out


def _counts(
    model, halves: list[LabeledData], target: int, trigger, reference: list | None = None
) -> list[dict]:
    """Per half: correct clean images, images, triggered non-target images sent to the target, those images;
    and the clean images whose top-1 differs from ``reference`` (the float model's predictions per half)."""
    out = []
    for k, half in enumerate(halves):
        m = evaluate(model, half, trigger)
        triggered = int((half.y != target).sum())
        out.append(
            {
                "correct": round(m.clean_acc * len(half)),
                "n": len(half),
                "hits": round(m.asr * triggered),
                "nt": triggered,
                "disagree": int((predict(model, half.x) != reference[k]).sum()) if reference else 0,
            }
        )
    return out


def _cell(job: tuple[str, int, int]) -> list[dict]:
    attack, bits, seed = job
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        result, src, data, _, _ = attacked_onnx(Path(tmp), attack, bits, seed, "digits")
        trigger = result.trigger
        calib = np.ascontiguousarray(data.train.x[:CALIBRATION].numpy())
        float_m = evaluate(session(src), data.test, trigger)
        quantize_images(src, Path(tmp) / "stock.onnx", calib[:1024], bits, efrap=False, progress=False)
        if not attack_fires(float_m, evaluate(session(Path(tmp) / "stock.onnx"), data.test, trigger)):
            return []
        order = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(0))
        halves = [
            LabeledData(data.test.x[idx], data.test.y[idx], data.test.num_classes)
            for idx in order.chunk(HALVES)
        ]
        cell = {"attack": attack, "bits": bits, "attack_seed": seed}
        float_s = session(src)
        reference = [predict(float_s, half.x) for half in halves]
        floats = _counts(float_s, halves, trigger.target, trigger)

        def measured(name: str, cfg: EFRAPConfig, data_in: np.ndarray, scored: tuple[int, ...]) -> None:
            t0 = time.perf_counter()
            quantize_images(src, Path(tmp) / "d.onnx", data_in, bits, config=cfg, progress=False)
            seconds = time.perf_counter() - t0
            got = _counts(session(Path(tmp) / "d.onnx"), halves, trigger.target, trigger, reference)
            for k in scored:
                rows.append(
                    {**cell, "run": name, "half": k, "seconds": round(seconds, 1), **_half(floats[k], got[k])}
                )

        for name, cfg in runs().items():
            measured(name, cfg, calib if cfg.budget is not None else calib[:1024], tuple(range(HALVES)))
        for budget in UNSEEN_BUDGETS:
            for k in range(HALVES):  # half k held out, unlabeled; scored on the other half only
                held = np.ascontiguousarray(halves[k].x.numpy())
                cfg = EFRAPConfig(
                    budget=budget, max_strength=0.8, margin_cap=None, holdout=len(held), holdout_choice="last"
                )
                measured(f"unseen-budget-{budget:g}", cfg, np.concatenate([calib[:1024], held]), (1 - k,))
    return rows


def _half(float_c: dict, efrap_c: dict) -> dict:
    return {
        "float_correct": float_c["correct"],
        "float_hits": float_c["hits"],
        "efrap_correct": efrap_c["correct"],
        "efrap_hits": efrap_c["hits"],
        "disagree": efrap_c["disagree"],
        "n": float_c["n"],
        "nt": float_c["nt"],
    }


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole


def _acc_drop(r: dict) -> float:
    return _pct(r["float_correct"] - r["efrap_correct"], r["n"])


def _within(r: dict) -> bool:
    """Clean accuracy within 1 point of float's, on the row's own images."""
    return _acc_drop(r) <= 1.0


def _oracle_key(r: dict) -> tuple[float, float]:
    """The uniform study's oracle: lowest asr, then the higher accuracy."""
    return _pct(r["efrap_hits"], r["nt"]), -_pct(r["efrap_correct"], r["n"])


def choices(rows: list[dict]) -> list[dict]:
    """Per cell and rule, the pooled rows (one per half) each rule scores: every image once."""
    out = []
    for cell in dict.fromkeys(_cell_key(r) for r in rows):
        mine = [r for r in rows if _cell_key(r) == cell]
        candidates = [r for r in mine if not r["run"].startswith("unseen-")]
        for name in dict.fromkeys(r["run"] for r in mine):  # unseen runs: two models, one per half
            out.append(
                _pooled(cell, name, [r for r in mine if r["run"] == name], not name.startswith("unseen-"))
            )
        in_sample = min(
            (
                _pooled(cell, n, [r for r in candidates if r["run"] == n], True)
                for n in dict.fromkeys(r["run"] for r in candidates)
            ),
            key=lambda p: (not p["within"], p["efrap_asr"], -p["efrap_acc"]),
        )
        out.append({**in_sample, "rule": "oracle-in-sample"})
        crossed, validated = [], []
        for k in range(HALVES):
            seen = [r for r in candidates if r["half"] == k]
            other = {r["run"]: r for r in candidates if r["half"] != k}
            pick = min(seen, key=lambda r: (not _within(r), *_oracle_key(r)))
            crossed.append(other[pick["run"]])
            uniform = [r for r in seen if r["run"].startswith("uniform-") and _within(r)]
            strongest = uniform[-1] if uniform else next(r for r in seen if r["run"] == "uniform-0.1")
            validated.append(other[strongest["run"]])
        out.append(_pooled(cell, "oracle-cross-fitted", crossed))
        out.append(_pooled(cell, "validation-labels", validated))
        for limit in UNSEEN_DISAGREEMENTS:
            out.append(_pooled(cell, f"unseen-disagreement-{limit:g}", _label_free(candidates, limit)))
    return out


def _label_free(candidates: list[dict], limit: float) -> list[dict]:
    """Per half k, the strongest uniform strength whose disagreement with the float model on half k (no
    labels, no trigger) is within ``limit`` points, as the other half measures it."""
    picked = []
    for k in range(HALVES):
        seen = [r for r in candidates if r["half"] == k and r["run"].startswith("uniform-")]
        other = {r["run"]: r for r in candidates if r["half"] != k}
        within = [r for r in seen if _pct(r["disagree"], r["n"]) <= limit]
        picked.append(other[(within[-1] if within else seen[0])["run"]])
    return picked


def _cell_key(r: dict) -> tuple[str, int, int]:
    return r["attack"], r["bits"], r["attack_seed"]


def _pooled(cell: tuple[str, int, int], rule: str, parts: list[dict], one_model: bool = False) -> dict:
    """One rule's outcome on a cell, its halves' counts summed; which runs it took on each half. Where both
    halves measured ``one_model``, the gap between its accuracy drops on them."""
    total = {
        k: sum(p[k] for p in parts)
        for k in ("float_correct", "float_hits", "efrap_correct", "efrap_hits", "n", "nt")
    }
    float_m = Metrics(total["float_correct"] / total["n"], total["float_hits"] / total["nt"], float("nan"))
    efrap_m = Metrics(total["efrap_correct"] / total["n"], total["efrap_hits"] / total["nt"], float("nan"))
    drops = [_acc_drop(p) for p in parts]
    return {
        "attack": cell[0],
        "bits": cell[1],
        "attack_seed": cell[2],
        "rule": rule,
        "runs": "/".join(p["run"] for p in parts),
        "images": total["n"],
        "float_acc": round(100 * float_m.clean_acc, 2),
        "float_asr": round(100 * float_m.asr, 2),
        "efrap_acc": round(100 * efrap_m.clean_acc, 2),
        "efrap_asr": round(100 * efrap_m.asr, 2),
        "half_gap": round(max(drops) - min(drops), 2) if one_model else "",
        "within": _within(total),
        "meets_bar": backdoor_removed(float_m, efrap_m),
        "meets_strict": meets_strict(float_m, efrap_m),
    }


def summary(pooled: list[dict]) -> list[dict]:
    """Per rule over the firing cells: bar counts, mean asr, mean and largest accuracy drop, and the
    largest gap between one model's accuracy drops on the two halves."""
    out = []
    for rule in dict.fromkeys(p["rule"] for p in pooled):
        mine = [p for p in pooled if p["rule"] == rule]
        gaps = [p["half_gap"] for p in mine if p["half_gap"] != ""]
        out.append(
            {
                "rule": rule,
                "cells": len(mine),
                "meets_bar": f"{sum(p['meets_bar'] for p in mine)}/{len(mine)}",
                "meets_strict": f"{sum(p['meets_strict'] for p in mine)}/{len(mine)}",
                "mean_efrap_asr": round(statistics.mean(p["efrap_asr"] for p in mine), 2),
                "mean_acc_drop": round(statistics.mean(p["float_acc"] - p["efrap_acc"] for p in mine), 2),
                "max_acc_drop": round(max(p["float_acc"] - p["efrap_acc"] for p in mine), 2),
                "max_half_gap": round(max(gaps), 2) if gaps else "",
            }
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--attack-seeds", type=int, default=3)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--cells", default=",".join(f"{a}:{b}" for a, b in CELLS), help="attack:bits,...")
    parser.add_argument(
        "--name", default="crossfit", help="file names: NAME.csv / .md, NAME-rules, NAME-summary"
    )
    args = parser.parse_args()
    configure_logging()
    cells = [(a, int(b)) for a, b in (c.split(":") for c in args.cells.split(","))]
    jobs = [(a, b, s) for a, b in cells for s in range(args.attack_seeds)]
    t0 = time.perf_counter()
    with get_context("spawn").Pool(args.procs, initializer=configure_logging) as pool:
        found = pool.map(_cell, jobs, chunksize=1)
    rows = [r for cell in found for r in cell]
    if not rows:
        raise SystemExit("no attack fired: nothing to measure")
    note = (
        "digits; every attack x bits x attack seed whose attack fires (float asr <= 10%, float acc >= 95%, stock "
        "asr >= 90%), on the full test split; onnxruntime int sessions; percentages. The test split is cut in two "
        "fixed halves (seed 0); counts per half. meets_bar: asr <= max(3, float asr + 1) and accuracy at most 1 "
        "point below float; meets_strict: asr <= max(3, float asr), same accuracy; both on the pooled halves. "
        f"{time.perf_counter() - t0:.0f} s on {args.procs} processes."
    )
    out = Path(args.out)
    write_table(out, args.name, rows, note)  # first: what was measured survives a failure below
    pooled = choices(rows)
    write_table(out, f"{args.name}-rules", pooled, note)
    write_table(out, f"{args.name}-summary", summary(pooled), note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
