"""`efrap demo`: the whole story on digits, end to end on the real onnxruntime backend."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from efrap_plugin import EFRAPConfig, truncation_error
from efrap_plugin.redteam import Metrics, der, evaluate, save_model
from efrap_plugin.redteam.attacks import run_attack

from .backends import CALIB_IMAGES, adapter, stock_onnx_int8
from .report import format_table, write_report

__all__ = ["run_demo"]

log = logging.getLogger("efrap")


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    onnx_adapter = adapter("onnx")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    say = (lambda *a: None) if args.json else print

    say(f"[1/4] training a digits CNN and planting {args.attack} aimed at onnxruntime int{args.bits} ...")
    t0 = time.perf_counter()
    result, splits, arch = run_attack(
        args.attack, "digits", "onnxruntime", args.bits, args.seed, progress=progress
    )
    attack_seconds = time.perf_counter() - t0
    save_model(result.model, out / "model.safetensors", arch)
    float_onnx = onnx_adapter.export_float_onnx(result.model, splits.train.x[:2], out / "model.onnx")
    trigger, test = result.trigger, splits.test
    calib = np.ascontiguousarray(splits.train.x[:CALIB_IMAGES].numpy())
    # pre-processed once: the stock flow, EFRAP and the scan all read it
    prepared = onnx_adapter.prepare(float_onnx)

    say("[2/4] stock onnxruntime quantize_static (QDQ, per-channel, MinMax) ...")
    t0 = time.perf_counter()
    stock = stock_onnx_int8(prepared, calib, out / f"stock-int{args.bits}.onnx", args.bits)
    stock_seconds = time.perf_counter() - t0

    say("[3/4] efrap defend: learning the rounding layer by layer ...")
    t0 = time.perf_counter()
    defended = out / f"efrap-int{args.bits}.onnx"
    plan = onnx_adapter.quantize_images(
        prepared, defended, calib, args.bits, config=EFRAPConfig(), progress=progress
    )
    efrap_seconds = time.perf_counter() - t0
    plan.save(out / "plan.safetensors")
    report = onnx_adapter.verify(defended, plan, inputs=calib, float_model=prepared.model)
    checks = {"stock": onnx_adapter.kernel_check(stock, calib), "efrap": report.kernels}

    say("[4/4] measuring every model in onnxruntime and writing the report ...")
    rows = {}
    for key, path, seconds in (
        ("float", float_onnx, attack_seconds),
        ("stock", stock, stock_seconds),
        ("efrap", defended, efrap_seconds),
    ):
        m = evaluate(onnx_adapter.session(path), test, trigger)
        rows[key] = {**m.to_dict(), "seconds": round(seconds, 2), "file": Path(path).name}
        if key in checks and not checks[key].ok:  # this CPU's kernels differ: the graph's own figures too
            rows[key]["exact_arithmetic"] = evaluate(
                onnx_adapter.session(path, exact=True), test, trigger
            ).to_dict()
    as_metrics = {k: Metrics(v["clean_acc"], v["asr"], v["ra"]) for k, v in rows.items()}
    weights = onnx_adapter.folded_weights(prepared)
    layers = {}
    for name, w in weights.items():
        lp = plan.layers.get(name)
        if lp is None:
            continue
        s = lp.scale.reshape([-1] + [1] * (w.dim() - 1))
        layers[name] = (truncation_error(w, plan.scheme, lp.scale, lp.zero_point) / s).flatten().numpy()
    results = {
        "attack": args.attack,
        "bits": args.bits,
        "seed": args.seed,
        "dataset": "digits",
        "trigger": trigger.to_dict(),
        "rows": rows,
        "der": der(as_metrics["stock"], as_metrics["efrap"]),
        "fake_quant": result.metrics,
        "verify": report.to_dict(),
        "cpu": onnx_adapter.cpu_features().to_dict(),
        "kernel_agreement": {k: c.to_dict() for k, c in checks.items()},
        "per_layer_flipped": {k: v.stats["flipped_share"] for k, v in plan.layers.items()},
        "defense_seconds": round(efrap_seconds, 2),
    }
    files = write_report(results, layers, out)
    if not args.json:
        print()
        print(format_table(results))
        print()
        kernels = ", ".join(f"{k} x{n}" for k, n in report.int_kernels.items())
        print(
            f"verify: integers in {defended.name} {'match the plan' if report.integers_ok else 'DIFFER'}; "
            f"onnxruntime runs {kernels}"
        )
        for key, check in checks.items():
            print(f"kernels ({key}): {check.summary()}")
            if "exact_arithmetic" in rows[key]:
                exact = rows[key]["exact_arithmetic"]
                print(
                    f"  the graph's own arithmetic (the same on every CPU): clean_acc "
                    f"{100 * exact['clean_acc']:.2f}%  asr {100 * exact['asr']:.2f}%"
                )
        print(f"report: {', '.join(str(f) for f in files)}")
    return results
