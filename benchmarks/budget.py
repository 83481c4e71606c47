"""Budget mode against the fixed default, the reference objective at 1,000 steps and preserve-only, on every
digits attack x bits x attack-seed cell whose attack fires, in onnxruntime; with ``--study early-stop``,
the early stop's settings (``patience``, ``settle``) against every layer's full 1,000 steps (``--study
early-stop-seeds``: two of them under three seeds of the batch sampling, each stopped run paired with the
full run of its seed); with ``--study steps``, fixed step counts per layer under three seeds of the batch
sampling: how far the outcome moves with the steps taken, against how far it moves with the seed alone;
with ``--study strength``, a stronger flip weight and longer runs under the same seeds: whether a fixed
default stronger or longer than today's would lower the asr without losing accuracy; with ``--study
ladder``, budget mode with its ladder topped above the default 0.5 (``EFRAPConfig.max_strength``); with
``--study uniform``, one strength for every layer (budget mode under a budget it cannot spend), to
measure a global choice of strength against budget mode's per-layer one, and what the best choice a cell
allows is when the test labels and the trigger pick it among the run's settings (the oracle: no rule
choosing among those settings without labels or trigger can do better on this run); with ``--study
seeds``, the fixed default and budget mode (at the default top and at 0.8) under three seeds of the batch
sampling: how far each one's outcome moves with the seed alone; with ``--study margin``, budget mode with
its ladder topped at 0.8 or 1 and capped by held-out margin risk (``EFRAPConfig.margin_cap``); with
``--study boundary``, uncapped budget mode with its held-out inputs picked nearest the float model's
decision boundaries (``EFRAPConfig.holdout_choice``, the default) or as the calibration data's last ones.

    python benchmarks/budget.py --out benchmarks/results [--budgets 0.5,1,2] [--attack-seeds 3] [--procs 2]
    python benchmarks/budget.py --study early-stop --out benchmarks/results
    python benchmarks/budget.py --study early-stop-seeds --out benchmarks/results
    python benchmarks/budget.py --study steps --out benchmarks/results
    python benchmarks/budget.py --study strength --out benchmarks/results
    python benchmarks/budget.py --study ladder --out benchmarks/results [--budgets 0.5,1]
    python benchmarks/budget.py --study uniform --out benchmarks/results [--budgets 0.5,1]
    python benchmarks/budget.py --study seeds --out benchmarks/results [--budgets 1]
    python benchmarks/budget.py --study margin --out benchmarks/results
    python benchmarks/budget.py --study boundary --out benchmarks/results

Every setting gets the same calibration data, the first 1,280 training images (all 1,257 on digits):
fixed settings use the first 1,024, budget mode holds out 256 (those nearest the float model's decision
boundaries, or with ``holdout_choice="last"`` the last ones) and learns on the others. ``disagreement`` is
measured for every row on the last 256 images, float ONNX model against the defended int8 one.
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from run import CELLS, attacked_onnx, configure_logging

from efrap_cli.report import write_table
from efrap_onnx import quantize_images, session
from efrap_plugin import HOLDOUT_CHOICES, EFRAPConfig, HeldOut
from efrap_plugin.redteam import Metrics, attack_fires, backdoor_removed, evaluate

HELD_OUT = 256


EARLY_STOPS = ((100, 0.005), (100, 0.01), (100, 0.02), (100, 0.03), (50, 0.01))
"""--study early-stop: (patience, settle) pairs measured against the full 1,000 steps."""
EARLY_STOPS_SEEDED = ((100, 0.02), (100, 0.03))
"""--study early-stop-seeds: the early stops that cut the steps 2x on one seed, each under STEP_SEEDS."""
STEPS = (250, 500, 1000, 2000)
"""--study steps: steps per layer, each under STEP_SEEDS."""
STEP_SEEDS = (1005, 1006, 1007)
FLIP_WEIGHTS = (1.0, 2.0)
"""--study strength: flip weights, each at STRENGTH_STEPS steps per layer under STEP_SEEDS."""
STRENGTH_STEPS = (1000, 2000)
LADDER_TOPS = (0.5, 0.6, 0.7, 0.8)
"""--study ladder: budget mode's max_strength, under each of --budgets."""
UNIFORM_STRENGTHS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)
"""--study uniform: the strengths every layer is given in turn (a budget of 100% takes the ladder's top)."""
SEEDS_TOP = 0.8
"""--study seeds: budget mode's other top, beside the default's."""
BOUNDARY_SETTINGS = ((0.5, 0.8), (1.0, 0.8))
"""--study boundary: (budget, max_strength) of uncapped budget mode, each with the held-out inputs picked
nearest the float model's decision boundaries (the default) and as the calibration data's last ones."""
MARGIN_SETTINGS = ((0.5, 0.8, 2.0), (0.5, 0.8, 4.0), (0.5, 0.8, 8.0), (1.0, 1.0, 4.0), (0.5, 0.7, 4.0))
"""--study margin: (budget, max_strength, margin_cap) of budget mode with its margin cap."""
BASELINES = {
    "budget": "fixed-flip-weight-1",
    "early-stop": "full-1000",
    "boundary": "default",
    "early-stop-seeds": "full-1000-seed-1005",
    "steps": "steps-1000-seed-1005",
    "strength": "flip-weight-1-steps-1000-seed-1005",
    "ladder": "default",
    "uniform": "default",
    "seeds": "fixed-seed-1005",
    "margin": "fixed-flip-weight-1",
}
"""Each study's row that seconds and steps are compared with (``default`` when it is the same config)."""


def settings(
    budgets: list[float], study: str = "budget", only: tuple[str, ...] = ()
) -> dict[str, EFRAPConfig]:
    """The rows of each cell: ``default`` is whatever EFRAPConfig() is; the others where they differ
    (of those, the ones named in ``only`` when it names any)."""
    rows = {"default": EFRAPConfig()}
    if study == "budget":
        candidates = {f"budget-{b:g}": _uncapped(b) for b in budgets}
        candidates["fixed-flip-weight-1"] = EFRAPConfig(budget=None)
        candidates["reference-1000"] = EFRAPConfig(budget=None, balance="reference", lr=1e-3)
        candidates["preserve-only"] = EFRAPConfig(budget=None, objective="preserve_only")
    elif study == "steps":
        candidates = {
            f"steps-{n}-seed-{seed}": EFRAPConfig(budget=None, patience=0, iters=n, seed=seed)
            for n in STEPS
            for seed in STEP_SEEDS
        }
    elif study == "strength":
        candidates = {
            f"flip-weight-{fw:g}-steps-{n}-seed-{seed}": EFRAPConfig(
                budget=None, patience=0, iters=n, seed=seed, flip_weight=fw
            )
            for fw in FLIP_WEIGHTS
            for n in STRENGTH_STEPS
            for seed in STEP_SEEDS
        }
    elif study == "ladder":
        candidates = {f"budget-{b:g}-top-{top:g}": _uncapped(b, top) for b in budgets for top in LADDER_TOPS}
    elif study == "uniform":
        candidates = {f"uniform-{s:g}": _uncapped(100, s) for s in UNIFORM_STRENGTHS}
        for b in budgets:  # budget mode's per-layer choice, at the default top and at the uniform top
            candidates[f"budget-{b:g}"] = _uncapped(b)
            candidates[f"budget-{b:g}-top-{UNIFORM_STRENGTHS[-1]:g}"] = _uncapped(b, UNIFORM_STRENGTHS[-1])
    elif study == "early-stop-seeds":
        candidates = {}
        for seed in STEP_SEEDS:
            candidates[f"full-1000-seed-{seed}"] = EFRAPConfig(budget=None, patience=0, seed=seed)
            for patience, settle in EARLY_STOPS_SEEDED:
                candidates[f"patience-{patience}-settle-{100 * settle:g}%-seed-{seed}"] = EFRAPConfig(
                    budget=None, patience=patience, settle=settle, seed=seed
                )
    elif study == "boundary":
        candidates = {}
        for b, top in BOUNDARY_SETTINGS:
            for choice in HOLDOUT_CHOICES:
                candidates[f"budget-{b:g}-top-{top:g}-{choice}"] = _uncapped(b, top, holdout_choice=choice)
    elif study == "margin":
        candidates = {
            f"budget-{b:g}-top-{top:g}-cap-{cap:g}": EFRAPConfig(budget=b, max_strength=top, margin_cap=cap)
            for b, top, cap in MARGIN_SETTINGS
        }
        candidates["fixed-flip-weight-1"] = EFRAPConfig(budget=None)
    elif study == "seeds":
        candidates = {}
        for seed in STEP_SEEDS:
            candidates[f"fixed-seed-{seed}"] = EFRAPConfig(budget=None, seed=seed)
            candidates[f"default-seed-{seed}"] = EFRAPConfig(seed=seed)
            for b in budgets:
                candidates[f"budget-{b:g}-seed-{seed}"] = _uncapped(b, seed=seed)
                candidates[f"budget-{b:g}-top-{SEEDS_TOP:g}-seed-{seed}"] = _uncapped(b, SEEDS_TOP, seed=seed)
    else:
        candidates = {"full-1000": EFRAPConfig(budget=None, patience=0)}
        # the noise floor: the full run with another seed of the batch sampling
        candidates["full-1000-seed-1006"] = EFRAPConfig(budget=None, patience=0, seed=1006)
        for patience, settle in EARLY_STOPS:
            candidates[f"patience-{patience}-settle-{100 * settle:g}%"] = EFRAPConfig(
                budget=None, patience=patience, settle=settle
            )
    unknown = set(only) - set(candidates)
    if unknown:
        raise SystemExit(
            f"--only: {sorted(unknown)} are not among --study {study}'s settings {sorted(candidates)}"
        )
    rows.update(
        {
            name: cfg
            for name, cfg in candidates.items()
            if cfg != rows["default"] and (not only or name in only)
        }
    )
    return rows


def _uncapped(budget: float, top: float = 0.5, **changes) -> EFRAPConfig:
    """Budget mode as the budget, ladder, uniform and seeds studies measured it: before the margin cap,
    its ladder topped at 0.5 unless said otherwise."""
    return EFRAPConfig(budget=budget, max_strength=top, margin_cap=None, **changes)


def _cell_of(r: dict) -> tuple[str, int, int]:
    """A row's cell: attack, bits, attack seed."""
    return r["attack"], r["bits"], r["attack_seed"]


def _logits(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _cell(job: tuple[str, int, int, list[float], str, bool, str, tuple[str, ...]]) -> list[dict]:
    attack, bits, seed, budgets, dataset, measure_all, study, only = job
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        result, src, data, _, _ = attacked_onnx(Path(tmp), attack, bits, seed, dataset)
        calib = np.ascontiguousarray(data.train.x[: 1024 + HELD_OUT].numpy())
        held = calib[len(calib) - HELD_OUT :]
        float_s = session(src)
        float_held = torch.from_numpy(_logits(float_s, held))
        float_m = evaluate(float_s, data.test, result.trigger)
        quantize_images(src, Path(tmp) / "stock.onnx", calib[:1024], bits, efrap=False, progress=False)
        stock = evaluate(session(Path(tmp) / "stock.onnx"), data.test, result.trigger)
        fires = attack_fires(float_m, stock)
        if not fires and not measure_all:
            logging.info("%s %d-bit seed %d: attack did not fire", attack, bits, seed)
            return []
        for name, cfg in settings(budgets, study, only).items():
            t0 = time.perf_counter()
            plan = quantize_images(src, Path(tmp) / "d.onnx", calib, bits, config=cfg, progress=False)
            seconds = time.perf_counter() - t0
            defended = session(Path(tmp) / "d.onnx")
            defended_held = torch.from_numpy(_logits(defended, held))
            seen = HeldOut(float_held, lambda logits=defended_held: logits).measure()  # the core's measure
            m = evaluate(defended, data.test, result.trigger)
            strengths = [lp.stats["strength"] for lp in plan.layers.values() if "strength" in lp.stats]
            rows.append(
                {
                    "dataset": dataset,
                    "attack": attack,
                    "bits": bits,
                    "attack_seed": seed,
                    "setting": name,
                    "attack_fires": fires,
                    "budget": "" if cfg.budget is None else cfg.budget,
                    "float_acc": round(100 * float_m.clean_acc, 2),
                    "float_asr": round(100 * float_m.asr, 2),
                    "stock_asr": round(100 * stock.asr, 2),
                    "efrap_acc": round(100 * m.clean_acc, 2),
                    "efrap_asr": round(100 * m.asr, 2),
                    "disagreement": round(seen.disagreement, 2),
                    "margin_risk": round(seen.margin_risk, 2),
                    "strength": round(statistics.mean(strengths), 3) if strengths else "",
                    "seconds": round(seconds, 1),
                    "steps": sum(lp.stats["steps"] for lp in plan.layers.values()),
                    "meets_bar": backdoor_removed(float_m, m),
                    "meets_strict": meets_strict(float_m, m),
                }
            )
    logging.info("%s %d-bit seed %d done", attack, bits, seed)
    return rows


def summary(rows: list[dict], study: str = "budget") -> list[dict]:
    """Per setting over the firing cells: bar counts, mean asr and accuracy drop; seconds and optimizer
    steps over the study's baseline's on the same cell (same process), and the mean (signed) and largest
    asr / accuracy change against it."""
    base = BASELINES[study] if any(r["setting"] == BASELINES[study] for r in rows) else "default"
    ref = {_cell_of(r): r for r in rows if r["setting"] == base}

    def of(r: dict) -> dict:
        return ref[_cell_of(r)]

    def moved(r: dict, key: str) -> float:
        return abs(r[key] - of(r)[key])

    out = []
    for name, mine in by_setting(rows).items():
        out.append(
            {
                "setting": name,
                "cells": len(mine),
                **bar_counts(mine),
                "max_acc_drop": round(max(r["float_acc"] - r["efrap_acc"] for r in mine), 2),
                "mean_disagreement": round(statistics.mean(r["disagreement"] for r in mine), 2),
                f"time_vs_{base}": round(statistics.mean(r["seconds"] / of(r)["seconds"] for r in mine), 2),
                f"steps_vs_{base}": round(
                    sum(r["steps"] for r in mine) / sum(of(r)["steps"] for r in mine), 3
                ),
                f"mean_asr_change_vs_{base}": round(
                    statistics.mean(r["efrap_asr"] - of(r)["efrap_asr"] for r in mine), 2
                ),
                f"mean_acc_change_vs_{base}": round(
                    statistics.mean(r["efrap_acc"] - of(r)["efrap_acc"] for r in mine), 2
                ),
                f"max_asr_change_vs_{base}": round(max(moved(r, "efrap_asr") for r in mine), 2),
                f"max_acc_change_vs_{base}": round(max(moved(r, "efrap_acc") for r in mine), 2),
            }
        )
    return out


def meets_strict(float_m: Metrics, efrap_m: Metrics) -> bool:
    """The strict bar: asr at most max(3%, the float model's own) and clean accuracy within 1 point."""
    return efrap_m.asr <= max(0.03, float_m.asr) and efrap_m.clean_acc >= float_m.clean_acc - 0.01


def by_setting(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows of each setting, settings in their first row's order."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["setting"], []).append(r)
    return groups


def bar_counts(mine: list[dict]) -> dict:
    """Rows meeting the bar and the strict bar (as 'k/n'), and their mean asr: every summary's first
    columns."""
    return {
        "meets_bar": f"{sum(r['meets_bar'] for r in mine)}/{len(mine)}",
        "meets_strict": f"{sum(r['meets_strict'] for r in mine)}/{len(mine)}",
        "mean_efrap_asr": round(statistics.mean(r["efrap_asr"] for r in mine), 2),
    }


def chosen(rows: list[dict], budgets: list[float]) -> list[dict]:
    """--study uniform, per cell: ``global-B``, the strongest uniform strength whose held-out disagreement
    exceeds the weakest one's by at most B points, searched from weak to strong as budget mode searches a
    layer (a selection among the measured runs: its seconds are the chosen run's alone); and
    ``oracle-test-labels``, the lowest asr of any row of the cell whose clean accuracy is within 1 point of
    float, picked with the test labels and the trigger (ties: the higher accuracy)."""
    out = []
    for cell in dict.fromkeys(_cell_of(r) for r in rows):
        mine = [r for r in rows if _cell_of(r) == cell]
        ladder = [r for r in mine if r["setting"].startswith("uniform-")]
        for b in budgets:
            pick = ladder[0]
            for r in ladder[1:]:
                if r["disagreement"] - ladder[0]["disagreement"] > b:
                    break
                pick = r
            out.append({**pick, "setting": f"global-{b:g}", "budget": b})
        within = [r for r in mine if r["efrap_acc"] >= r["float_acc"] - 1]
        best = min(within, key=lambda r: (r["efrap_asr"], -r["efrap_acc"]))
        out.append({**best, "setting": "oracle-test-labels", "budget": ""})
    return out


def pooled(rows: list[dict], study: str) -> list[dict]:
    """Per setting over every firing cell and sampling seed (``-seed-N`` dropped from the name; ``default``
    is the study's baseline): bar counts, mean asr and accuracy drop, and the seed spread (largest minus
    smallest over the seeds of one cell), averaged over the cells: the noise a setting must beat."""
    seedless = re.compile(r"-seed-\d+$")
    # ``default`` is the baseline's run unless the baseline has rows of its own
    own = any(r["setting"] == BASELINES[study] for r in rows)
    default = f"default-seed-{EFRAPConfig().seed}" if own else BASELINES[study]

    def named(r: dict) -> str:
        return default if r["setting"] == "default" else r["setting"]

    def group(r: dict) -> str:
        return seedless.sub("", named(r))

    def seed(r: dict) -> str:
        found = seedless.search(named(r))
        return found.group() if found else ""

    base = seedless.sub("", BASELINES[study])
    ref = {(_cell_of(r), seed(r)): r for r in rows if group(r) == base}
    out = []
    for name in dict.fromkeys(group(r) for r in rows):
        mine = [r for r in rows if group(r) == name]
        cells: dict[tuple, list[dict]] = {}
        for r in mine:
            cells.setdefault(_cell_of(r), []).append(r)
        drops = [r["float_acc"] - r["efrap_acc"] for r in mine]
        out.append(
            {
                "setting": name,
                "runs": len(mine),
                **bar_counts(mine),
                "mean_acc_drop": round(statistics.mean(drops), 2),
                "max_acc_drop": round(max(drops), 2),
                "mean_seed_spread_asr": round(_seed_spread(cells, "efrap_asr"), 2),
                "mean_seed_spread_acc": round(_seed_spread(cells, "efrap_acc"), 2),
                **_paired(mine, lambda r: ref.get((_cell_of(r), seed(r))), base),
                "seconds": round(sum(r["seconds"] for r in mine), 1),
            }
        )
    return out


def _paired(rows: list[dict], partner, base: str) -> dict:
    """Steps, and the mean and largest asr / accuracy change, against the baseline's run on the same cell
    under the same sampling seed (the pairs the seed spread is the noise of); empty without partners."""
    pairs = [(r, partner(r)) for r in rows if partner(r) is not None]
    if not pairs:
        return {}
    asr = [r["efrap_asr"] - b["efrap_asr"] for r, b in pairs]
    acc = [r["efrap_acc"] - b["efrap_acc"] for r, b in pairs]
    return {
        f"steps_vs_{base}": round(sum(r["steps"] for r, _ in pairs) / sum(b["steps"] for _, b in pairs), 3),
        f"mean_asr_change_vs_{base}": round(statistics.mean(asr), 2),
        f"mean_acc_change_vs_{base}": round(statistics.mean(acc), 2),
        f"max_asr_change_vs_{base}": round(max(map(abs, asr)), 2),
        f"max_acc_change_vs_{base}": round(max(map(abs, acc)), 2),
    }


def _seed_spread(cells: dict[tuple, list[dict]], key: str) -> float:
    """Largest minus smallest ``key`` over the sampling seeds of each cell, averaged over the cells."""
    return statistics.mean(max(r[key] for r in c) - min(r[key] for r in c) for c in cells.values())


def _grid(rows: list[dict]):
    """One small panel per firing cell, five to a row, sharing the y axis: (cells, figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys(_cell_of(r) for r in rows))
    cols = min(len(cells), 5)
    rows_n = -(-len(cells) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(2.6 * cols, 2.4 * rows_n), sharey=True, squeeze=False)
    for ax in axes.flat[len(cells) :]:
        ax.axis("off")
    return cells, fig, axes


def _save(fig, axes, path: Path) -> None:
    """The legend on the first panel; written to a temporary name and renamed."""
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def plot(rows: list[dict], budgets: list[float], path: Path) -> None:
    """asr against the budget for each firing cell; the fixed default dashed, the float model dotted."""
    cells, fig, axes = _grid(rows)
    for ax, cell in zip(axes.flat, cells):
        mine = {r["setting"]: r for r in rows if _cell_of(r) == cell}
        xs = [b for b in budgets if f"budget-{b:g}" in mine]
        ax.plot(xs, [mine[f"budget-{b:g}"]["efrap_asr"] for b in xs], "o-", label="budget mode")
        fixed = mine.get("fixed-flip-weight-1", mine["default"])
        ax.axhline(fixed["efrap_asr"], ls="--", c="gray", label="fixed flip_weight 1")
        ax.axhline(fixed["float_asr"], ls=":", c="k", label="float model")
        ax.set_title(f"{cell[0]}-{cell[1]} s{cell[2]}", fontsize=8)
        ax.set_xlabel("budget (%)", fontsize=8)
    for row in axes:
        row[0].set_ylabel("asr (%)")
    _save(fig, axes, path)


def plot_uniform(rows: list[dict], path: Path) -> None:
    """--study uniform: asr and clean-accuracy drop against the strength every layer gets, per firing cell;
    the float model's asr dotted, a 1-point drop dashed."""
    cells, fig, axes = _grid(rows)
    for ax, cell in zip(axes.flat, cells):
        mine = [r for r in rows if _cell_of(r) == cell and r["setting"].startswith("uniform-")]
        xs = [float(r["setting"].removeprefix("uniform-")) for r in mine]
        ax.plot(xs, [r["efrap_asr"] for r in mine], "o-", ms=3, label="asr")
        ax.plot(xs, [r["float_acc"] - r["efrap_acc"] for r in mine], "s-", ms=3, label="accuracy drop")
        ax.axhline(mine[0]["float_asr"], ls=":", c="k", label="float asr")
        ax.axhline(1.0, ls="--", c="gray", label="1-point drop")
        ax.set_title(f"{cell[0]}-{cell[1]} s{cell[2]}", fontsize=8)
        ax.set_xlabel("strength (every layer)", fontsize=8)
    for row in axes:
        row[0].set_ylabel("percent / points")
    _save(fig, axes, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--budgets", default="0.5,1,2")
    parser.add_argument("--attack-seeds", type=int, default=3)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist"])
    parser.add_argument("--cells", default=",".join(f"{a}:{b}" for a, b in CELLS), help="attack:bits,...")
    parser.add_argument("--measure-all", action="store_true", help="also cells whose attack misses the bars")
    parser.add_argument("--study", default="budget", choices=sorted(BASELINES))
    parser.add_argument("--only", default="", help="setting,...: measure only these of the study's rows")
    parser.add_argument(
        "--name", help="file names: NAME.csv / .md (/ .png), NAME-summary (default: the study)"
    )
    args = parser.parse_args()
    configure_logging()
    budgets = [float(b) for b in args.budgets.split(",")]
    cells = [(a, int(b)) for a, b in (c.split(":") for c in args.cells.split(","))]
    name = args.name or args.study
    only = tuple(filter(None, args.only.split(",")))
    settings(budgets, args.study, only)  # an unknown --only name stops here, before any cell runs
    jobs = [
        (a, b, s, budgets, args.dataset, args.measure_all, args.study, only)
        for a, b in cells
        for s in range(args.attack_seeds)
    ]
    t0 = time.perf_counter()
    out = Path(args.out)
    rows = []
    with get_context("spawn").Pool(args.procs, initializer=configure_logging) as pool:
        for cell in pool.imap_unordered(_cell, jobs):
            rows += cell
            if rows:  # a long run leaves what it measured so far
                write_table(out, f"{name}-partial", rows, "cells measured so far")
    (out / f"{name}-partial.csv").unlink(missing_ok=True)
    (out / f"{name}-partial.md").unlink(missing_ok=True)
    order = {job[:3]: i for i, job in enumerate(jobs)}
    if args.study == "uniform":
        rows += chosen(rows, budgets)
    rows.sort(key=lambda r: order[_cell_of(r)])  # stable: settings keep their order
    note = (
        f"{args.dataset}; every attack x bits x attack seed whose attack fires (float asr <= 10%, float acc >= 95%, stock "
        "asr >= 90%); onnxruntime int sessions; percentages. meets_bar: asr <= max(3, float asr + 1) and accuracy "
        "at most 1 point below float (the project's bar); meets_strict: asr <= max(3, float asr), same accuracy. "
        f"disagreement: top-1 against the float model on the last {HELD_OUT} calibration images. "
        f"{time.perf_counter() - t0:.0f} s on {args.procs} processes."
        + (
            " --measure-all: cells whose attack misses the bars are measured too (attack_fires)."
            if args.measure_all
            else ""
        )
    )
    if args.study == "uniform":
        note += (
            " global-B: the strongest uniform strength within B points of the weakest one's held-out "
            "disagreement (chosen among the uniform rows: its seconds are that run's alone); "
            "oracle-test-labels: each cell's lowest asr within 1 point of float accuracy, picked with the "
            "test labels and the trigger. margin_risk: held-out images whose float-class margin is halved."
        )
    write_table(out, name, rows, note)
    write_table(out, f"{name}-summary", summary(rows, args.study), note)
    if args.study in ("steps", "strength", "seeds", "early-stop-seeds"):
        write_table(out, f"{name}-pooled", pooled(rows, args.study), note)
    if args.study == "budget":
        plot(rows, budgets, out / f"{name}.png")
    if args.study == "uniform":
        plot_uniform(rows, out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
