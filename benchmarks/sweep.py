"""Attack-setting sweeps: train many attack variants in parallel (optionally on an accelerator), then
measure each one on the real onnxruntime artifact (float, stock int8/int4, EFRAP over two seeds).

    python benchmarks/sweep.py train benchmarks/specs/digits-8bit.json --out sweep/ [--procs 16]
    python benchmarks/sweep.py evaluate sweep/ > sweep/eval.jsonl
    python benchmarks/sweep.py report sweep/eval.jsonl --name attack-sweep-digits --out benchmarks/results

A spec is a JSON list of {"id", "attack", "bits", "dataset"?, "seed"?, "width"?, "device"?, "cfg"?}:
``cfg`` overrides fields of the attack's default config for that dataset. Training is the slow part
(the QAT attacks on Fashion-MNIST want a GPU); evaluation runs on CPU, as onnxruntime's int8 does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from efrap_cli.report import write_table
from efrap_plugin.redteam import Metrics, attack_fires, backdoor_removed

EFRAP_SEEDS = (1005, 1006)


def _pair(metrics) -> list[float]:
    return [round(100 * metrics.clean_acc, 2), round(100 * metrics.asr, 2)]


def _metrics(pair) -> Metrics:
    """A table's (clean_acc %, asr %) pair as Metrics, for the project's bars."""
    return Metrics(pair[0] / 100, pair[1] / 100, float("nan"))


def _cell(pair) -> str:
    """A table cell 'acc / asr' from a [acc, asr] pair in percent."""
    return "{:.2f} / {:.2f}".format(*pair)


def _trained(folder: str) -> dict[str, dict]:
    """The specs ``train`` finished without error, by id (DIR/train.jsonl)."""
    rows = [json.loads(line) for line in (Path(folder) / "train.jsonl").read_text().splitlines()]
    return {row["id"]: row for row in rows if "error" not in row}


def train_one(spec: dict, out: str, threads: int = 1) -> dict:
    """One attack variant: train it and save DIR/models/<id>.safetensors; errors come back as data."""
    torch.set_num_threads(threads)
    from efrap_plugin.redteam import save_model
    from efrap_plugin.redteam.attacks import default_arch, default_config, run_attack

    t0 = time.time()
    try:
        dataset = spec.get("dataset", "digits")
        seed = spec.get("seed", 0)
        cfg = dataclasses.replace(default_config(spec["attack"], dataset, seed), **spec.get("cfg", {}))
        arch = default_arch(dataset)
        if "width" in spec:
            arch = dict(arch, width=spec["width"])
        result, _, arch = run_attack(
            spec["attack"],
            dataset,
            "onnxruntime",
            spec["bits"],
            seed=seed,
            arch=arch,
            config=cfg,
            progress=False,
            device=spec.get("device"),
        )
        (Path(out) / "models").mkdir(parents=True, exist_ok=True)
        save_model(result.model, Path(out) / "models" / f"{spec['id']}.safetensors", arch)
        fake = {
            k: [round(100 * v["clean_acc"], 2), round(100 * v["asr"], 2)] for k, v in result.metrics.items()
        }
        return dict(spec, s=round(time.time() - t0), fake=fake)
    except Exception:
        return dict(spec, error=traceback.format_exc()[-1500:])


def _train_job(job: tuple[dict, str, int]) -> dict:
    return train_one(*job)


def cmd_train(args: argparse.Namespace) -> None:
    """Jobs run in parallel; each finished one is written at once, so a run cut short keeps its results."""
    specs = json.loads(Path(args.specs).read_text())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with (
        get_context("spawn").Pool(args.procs) as pool,
        open(Path(args.out) / "train.jsonl", "w") as fh,
    ):
        for row in pool.imap_unordered(_train_job, [(s, args.out, args.threads) for s in specs]):
            fh.write(json.dumps(row) + "\n")
            fh.flush()


def evaluate_one(path: Path, spec: dict) -> dict:
    """Float, stock and EFRAP (two seeds, when the stock model is backdoored) in onnxruntime sessions."""
    from efrap_onnx import export_float_onnx, quantize_images, session
    from efrap_plugin import EFRAPConfig
    from efrap_plugin.redteam import evaluate, load_dataset, load_model
    from efrap_plugin.redteam.attacks import default_trigger

    t0 = time.time()
    data = load_dataset(spec.get("dataset", "digits"))
    trigger = default_trigger(data.train.x.shape[-2])
    calib = np.ascontiguousarray(data.train.x[:1024].numpy())
    model, _ = load_model(path)
    bits = spec["bits"]
    row = {"id": path.stem, "fake": spec["fake"]}
    with tempfile.TemporaryDirectory() as tmp:
        src = export_float_onnx(model, data.train.x[:2], Path(tmp) / "f.onnx")
        row["float"] = _pair(evaluate(session(src), data.test, trigger))
        quantize_images(src, Path(tmp) / "s.onnx", calib, bits, efrap=False, progress=False)
        row["stock"] = _pair(evaluate(session(Path(tmp) / "s.onnx"), data.test, trigger))
        if row["stock"][1] >= 50:
            for seed in EFRAP_SEEDS:
                cfg = EFRAPConfig(seed=seed)
                quantize_images(
                    src, Path(tmp) / "d.onnx", calib, bits, efrap=True, config=cfg, progress=False
                )
                row.setdefault("efrap", []).append(
                    _pair(evaluate(session(Path(tmp) / "d.onnx"), data.test, trigger))
                )
    row["s"] = round(time.time() - t0)
    return row


def cmd_evaluate(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    specs = _trained(args.dir)
    for path in sorted((Path(args.dir) / "models").glob("*.safetensors")):
        if path.stem in specs:
            print(json.dumps(evaluate_one(path, specs[path.stem])), flush=True)


def cmd_tradeoff(args: argparse.Namespace) -> None:
    """EFRAP's clean-accuracy / asr trade-off against its settings, on models the sweep trained.

    Each variant is a JSON object of EFRAPConfig fields; ``--flip-weights`` is the common shorthand.
    """
    from efrap_onnx import export_float_onnx, quantize_images, session
    from efrap_plugin import EFRAPConfig
    from efrap_plugin.redteam import evaluate, load_dataset, load_model
    from efrap_plugin.redteam.attacks import default_trigger

    torch.set_num_threads(1)
    specs = _trained(args.dir)
    variants = [json.loads(v) for v in args.variants] or [
        {"flip_weight": float(w)} for w in args.flip_weights.split(",")
    ]
    rows = []
    for model_id in args.ids.split(","):
        spec = specs[model_id]
        data = load_dataset(spec.get("dataset", "digits"))
        trigger = default_trigger(data.train.x.shape[-2])
        model, _ = load_model(Path(args.dir) / "models" / f"{model_id}.safetensors")
        with tempfile.TemporaryDirectory() as tmp:
            src = export_float_onnx(model, data.train.x[:2], Path(tmp) / "f.onnx")
            float_m = evaluate(session(src), data.test, trigger)
            for variant in variants:
                t0 = time.perf_counter()
                cfg = EFRAPConfig(**{"budget": None, **variant})
                calib = np.ascontiguousarray(data.train.x[: cfg.calib_size].numpy())
                plan = quantize_images(
                    src, Path(tmp) / "d.onnx", calib, spec["bits"], config=cfg, progress=False
                )
                m = evaluate(session(Path(tmp) / "d.onnx"), data.test, trigger)
                rows.append(
                    {
                        "id": model_id,
                        "efrap_config": json.dumps(variant),
                        "float_acc / asr": _cell(_pair(float_m)),
                        "efrap_acc / asr": _cell(_pair(m)),
                        "acc_drop": f"{100 * (float_m.clean_acc - m.clean_acc):.2f}",
                        "flipped_%": f"{100 * plan.flipped_share:.2f}",
                        "defense_s": f"{time.perf_counter() - t0:.0f}",
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    note = (
        "EFRAP (default config, seed 1005, but for the fields each row names; calibration: the first "
        "calib_size training images); onnxruntime int sessions; percentages."
    )
    write_table(Path(args.out), args.name, rows, note)


def cmd_report(args: argparse.Namespace) -> None:
    specs = {}
    for path in args.specs:
        specs.update({s["id"]: s for s in json.loads(Path(path).read_text())})
    rows = []
    for line in Path(args.eval).read_text().splitlines():
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        spec = specs.get(r["id"], {})
        efrap = r.get("efrap", [])
        rows.append(
            {
                "id": r["id"],
                "setting": json.dumps({k: v for k, v in spec.items() if k not in ("id", "attack", "bits")}),
                "float_acc / asr": _cell(r["float"]),
                "stock_acc / asr": _cell(r["stock"]),
                "efrap_acc / asr": "; ".join(_cell(e) for e in efrap) or "-",
                "attack_met": attack_fires(_metrics(r["float"]), _metrics(r["stock"])),
                "defense_met": bool(efrap)
                and all(backdoor_removed(_metrics(r["float"]), _metrics(e), asr_cap=0.03) for e in efrap),
            }
        )
    note = (
        "onnxruntime sessions: float export, stock quantize_static (QDQ, per-channel, MinMax), EFRAP "
        f"(seeds {', '.join(map(str, EFRAP_SEEDS))}; only where stock asr >= 50%). Percentages. "
        "Settings are the spec's overrides of the attack's default config."
    )
    argv = list(sys.argv)
    if "--note" in argv:  # the note is printed below the command, not inside it
        i = argv.index("--note")
        argv[i : i + 2] = ["--note", "..."]
    if args.note:
        note += " " + args.note
    write_table(Path(args.out), args.name, rows, note, command=shlex.join(["python", *argv]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("specs")
    p.add_argument("--out", required=True)
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("evaluate")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_evaluate)
    p = sub.add_parser("report")
    p.add_argument("eval")
    p.add_argument("--specs", nargs="+", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--note", default="", help="where and how the models were trained")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("tradeoff")
    p.add_argument("dir")
    p.add_argument("--ids", required=True)
    p.add_argument("--flip-weights", default="0.5,1,2,4")
    p.add_argument(
        "--variants", nargs="*", default=[], help="EFRAPConfig fields as JSON, e.g. '{\"iters\": 3000}'"
    )
    p.add_argument("--name", required=True)
    p.add_argument("--out", default="benchmarks/results")
    p.set_defaults(fn=cmd_tradeoff)
    args = parser.parse_args()
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
