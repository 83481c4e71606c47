"""Each subcommand maps its flags onto library calls; no logic of its own beyond I/O."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from efrap_plugin import (
    DataError,
    EFRAPConfig,
    EFRAPError,
    LabeledData,
    QuantScheme,
    as_calibration,
    atomic_write,
    check_writable,
    core_weight,
    crowded_layers,
    format_scan,
    inputs_needed,
    load_npz_inputs,
    prepare_model,
    quantizable_layers,
    resolve_device,
    scan_weights,
    scheme_preset,
    staged,
)
from efrap_plugin.npz import read_npz_arrays
from efrap_plugin.redteam import (
    Metrics,
    Outcomes,
    PatchTrigger,
    backdoor_removed,
    evaluate,
    intervals,
    load_dataset,
    load_model,
    outcomes,
    paired_change,
    save_model,
)
from efrap_plugin.redteam.attacks import run_attack

from .backends import CALIB_IMAGES, adapter, stock_onnx_int8, stock_runner

__all__ = ["COMMANDS", "UsageError", "load_attack_info", "calibration_images"]

log = logging.getLogger("efrap")


def calibration_inputs(spec: str, n: int, names: list[str]) -> np.ndarray | dict[str, np.ndarray]:
    """``calibration_images`` for a model with one input (from an .npz: its array 'x', or the one named
    as the input); for several, an .npz with one array per input, named as the input."""
    path = Path(spec)
    if len(names) == 1 and names[0] != "x" and path.suffix == ".npz" and path.is_file():
        held = read_npz_arrays(path, ())[1]  # the archive's array names; no array is read
        if "x" not in held:
            if names[0] not in held:
                raise DataError(
                    f"{path}: expected an array named 'x' or {names[0]!r} (the model's input), found {held}"
                )
            return load_npz_inputs(path, names, n)
    if len(names) == 1:
        return calibration_images(spec, n)
    if spec in ("digits", "fashion-mnist"):
        raise EFRAPError(
            f"--calib {spec}: feeds one image input; the model takes {names}. Pass an .npz with one array per input"
        )
    return load_npz_inputs(Path(spec), names, n)


def calibration_images(spec: str, n: int) -> np.ndarray:
    """'digits', 'fashion-mnist' (the training split of the canonical seed-0 split, disjoint from the
    test split `efrap evaluate` uses) or a path to an .npz with array 'x'."""
    if spec in ("digits", "fashion-mnist"):
        x = load_dataset(spec, seed=0).train.x
    else:
        x = as_calibration(Path(spec), n)
    return np.ascontiguousarray(x[:n].numpy())  # float32, or token ids as they are (as_calibration)


def load_attack_info(path: str | Path) -> dict[str, Any]:
    """attack.json as `efrap attack` writes it: the dataset name and a valid trigger, or a clear error."""
    path = Path(path)
    if not path.is_file():
        raise EFRAPError(
            f"--attack-info: {path} does not exist; pass the attack.json written by `efrap attack`"
        )
    if path.stat().st_size > _MAX_ATTACK_INFO:
        raise EFRAPError(
            f"--attack-info: {path} is too large for an attack.json ({path.stat().st_size} bytes)"
        )
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EFRAPError(f"--attack-info: {path} is not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise EFRAPError(f"--attack-info: {path} holds a JSON {type(info).__name__}, expected an object")
    for key in ("trigger", "dataset"):
        if key not in info:
            raise EFRAPError(f"--attack-info: {path} lacks {key!r}; was it written by `efrap attack`?")
    try:
        info["trigger"] = PatchTrigger.from_dict(info["trigger"])
    except (EFRAPError, TypeError) as exc:
        raise EFRAPError(f"--attack-info: {path} holds an invalid trigger ({exc})") from None
    return info


class UsageError(EFRAPError):
    """Arguments that contradict each other (exit code 2, like argparse's own usage errors)."""


_MAX_ATTACK_INFO = 1 << 20


def _distinct_paths(paths: dict[str, Path | None]) -> None:
    """Refuse two arguments naming the same file: writing one would destroy the other."""
    seen: dict[Path, str] = {}
    for flag, path in paths.items():
        if path is None:
            continue
        key = path.resolve()
        for other_key, other in seen.items():
            same = key == other_key or (key.exists() and other_key.exists() and key.samefile(other_key))
            if same:
                raise UsageError(
                    f"{flag}: {path} is the same file as {other}; writing it would destroy that file. "
                    f"Pass another {flag}"
                )
        seen[key] = f"{flag} {path}"


def _metrics(model: Any, test: LabeledData, trigger: PatchTrigger) -> dict[str, float]:
    return _rounded(evaluate(model, test, trigger))


def _rounded(metrics: Metrics) -> dict[str, float]:
    return {k: round(v, 4) for k, v in metrics.to_dict().items()}


# ----- efrap attack ----------------------------------------------------------------------------
def _onnx_stock_metrics(
    onnx_adapter: Any, stock: Path, test: LabeledData, trigger: PatchTrigger, bits: int
) -> dict[str, dict[str, Any]]:
    """The stock int8 model in the graph's own arithmetic (the same on every CPU: what the file is), and,
    where this CPU's fused kernels change it, those figures too, with the CPU named."""
    key = f"onnxruntime-int{bits}-stock"
    exact = _metrics(onnx_adapter.session(stock, exact=True), test, trigger)
    kernels = _metrics(onnx_adapter.session(stock), test, trigger)
    if kernels == exact:
        return {key: exact}
    return {key: exact, f"{key}-kernels": {**kernels, "cpu": onnx_adapter.cpu_features().describe()}}


def cmd_attack(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    result, splits, arch = run_attack(
        args.attack,
        args.dataset,
        args.scheme,
        args.bits,
        args.seed,
        progress=not args.quiet,
        device=args.device,
    )
    out.mkdir(parents=True, exist_ok=True)
    save_model(result.model, out / "model.safetensors", arch)
    info = {
        **result.info(),
        "dataset": args.dataset,
        "scheme": args.scheme,
        "bits": args.bits,
        "seed": args.seed,
        "arch": arch,
    }
    onnx_adapter = adapter("onnx")
    onnx_adapter.export_float_onnx(result.model, splits.train.x[:2], out / "model.onnx")
    if args.scheme == "onnxruntime" and args.bits in (8, 4):
        with tempfile.TemporaryDirectory() as tmp:
            stock = stock_onnx_int8(
                out / "model.onnx", splits.train.x[:CALIB_IMAGES].numpy(), Path(tmp) / "q.onnx", args.bits
            )
            info["metrics"].update(
                _onnx_stock_metrics(onnx_adapter, stock, splits.test, result.trigger, args.bits)
            )
    elif args.scheme == "torchao-x86" and args.bits == 8:
        converted = adapter("torchao").quantize_pt2e(result.model, splits.train.x[:CALIB_IMAGES])
        info["metrics"]["torchao-pt2e-int8-stock"] = _metrics(converted, splits.test, result.trigger)
    atomic_write(out / "attack.json", json.dumps(info, indent=2).encode())
    if not args.json:
        print(f"{args.attack} on {args.dataset}, aimed at {args.scheme} {args.bits}-bit; wrote {out}/")
        for row, m in info["metrics"].items():
            on = f"   (this CPU: {m['cpu']})" if "cpu" in m else ""
            print(f"  {row:<32} clean_acc {100 * m['clean_acc']:6.2f}%   asr {100 * m['asr']:6.2f}%{on}")
    return info


# ----- efrap evaluate --------------------------------------------------------------------------
def _model_file(path: Path, flag: str) -> Path:
    if path.suffix not in (".onnx", ".safetensors"):
        raise EFRAPError(f"{flag}: expected a .onnx or .safetensors file, got {path.name!r}")
    return path


def _as_is(path: Path) -> tuple[Any, str, Path | None]:
    """The model in a file, run as it is: an onnxruntime session (and its file) or a float torch model."""
    if path.suffix == ".onnx":
        return adapter("onnx").session(adapter("onnx").load_onnx(path)), "onnxruntime session", path
    return load_model(path)[0], "float torch model", None


def _kernel_agreement(
    onnx_file: Path | None, test: LabeledData, trigger: PatchTrigger
) -> dict[str, Any] | None:
    """For a quantized ONNX model: whether this CPU's fused kernels compute what its graph says on the
    test images, and, where they do not, the figures of the graph's own arithmetic beside the kernels'."""
    onnx_adapter = adapter("onnx")
    model = None if onnx_file is None else onnx_adapter.load_onnx(onnx_file, check_finite=False)
    if model is None or not onnx_adapter.weight_integers(model):
        return None
    check = onnx_adapter.kernel_check(model, np.ascontiguousarray(test.x.numpy()))  # the file read once
    found = {"kernel_agreement": check.to_dict(), "summary": check.summary()}
    if not check.ok:
        exact = outcomes(onnx_adapter.session(onnx_file, exact=True), test, trigger).metrics()
        found["exact_arithmetic"] = _rounded(exact)
    return found


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    info = load_attack_info(args.attack_info)
    splits = load_dataset(info["dataset"])
    trigger = info["trigger"]
    path = _model_file(Path(args.model), "model")
    reference = _model_file(Path(args.against), "--against") if args.against else None
    with tempfile.TemporaryDirectory(prefix="efrap-evaluate-") as tmp:
        if args.quantize == "nearest":
            runner, label, onnx_file = stock_runner(args.scheme, path, splits, Path(tmp), args.bits)
        else:
            runner, label, onnx_file = _as_is(path)
        seen = outcomes(runner, splits.test, trigger)
        against = _against(reference, seen, splits.test, trigger) if reference else None
        kernels = _kernel_agreement(onnx_file, splits.test, trigger)
    measured = seen.metrics()
    bounds = intervals(measured, splits.test, trigger)
    result = {
        "model": str(path),
        "evaluated": label,
        **_rounded(measured),
        "images": len(splits.test),
        "triggered_images": len(seen.to_target),
        "intervals": {k: [round(lo, 4), round(hi, 4)] for k, (lo, hi) in bounds.items()},
    }
    if against:
        result["against"] = against
    if kernels:
        result["kernel_agreement"] = kernels["kernel_agreement"]
        if "exact_arithmetic" in kernels:
            result["exact_arithmetic"] = kernels["exact_arithmetic"]
    if not args.json:
        shown = "  ".join(
            f"{k} {100 * result[k]:.2f}% ({100 * lo:.1f}-{100 * hi:.1f})" for k, (lo, hi) in bounds.items()
        )
        print(
            f"{path.name} ({label}): {shown}; 95% intervals over {result['images']} test images "
            f"({result['triggered_images']} triggered)"
        )
        if against:
            changes = "  ".join(
                f"{k} {100 * d:+.2f} points ({100 * lo:+.1f} to {100 * hi:+.1f})"
                for k, (d, lo, hi) in ((k, against[f"{k}_change"]) for k in ("clean_acc", "asr"))
            )
            print(
                f"against {Path(against['model']).name} ({against['evaluated']}: clean_acc "
                f"{100 * against['clean_acc']:.2f}%  asr {100 * against['asr']:.2f}%): {changes}; paired 95% "
                f"intervals; removal bar (asr <= max(3%, its asr + 1), accuracy within 1 point): "
                f"{'met' if against['removal_bar'] else 'NOT met'}"
            )
        if kernels:
            print(f"kernels: {kernels['summary']}")
        if kernels and "exact_arithmetic" in kernels:
            exact = kernels["exact_arithmetic"]
            print(
                f"the graph's own arithmetic (unfused, the same on every CPU): clean_acc "
                f"{100 * exact['clean_acc']:.2f}%  asr {100 * exact['asr']:.2f}%"
            )
    return result


def _against(reference: Path, seen: Outcomes, test: LabeledData, trigger: PatchTrigger) -> dict[str, Any]:
    """The evaluated model's outcomes against the reference model's on the same images: each change with
    its paired interval."""
    ref_runner, ref_label, _ = _as_is(reference)
    ref = outcomes(ref_runner, test, trigger)
    ref_m = ref.metrics()
    return {
        "model": str(reference),
        "evaluated": ref_label,
        "clean_acc": round(ref_m.clean_acc, 4),
        "asr": round(ref_m.asr, 4),
        "clean_acc_change": [round(v, 4) for v in paired_change(ref.right, seen.right)],
        "asr_change": [round(v, 4) for v in paired_change(ref.to_target, seen.to_target)],
        "removal_bar": backdoor_removed(ref_m, seen.metrics()),
    }


# ----- efrap defend ----------------------------------------------------------------------------
def _config(args: argparse.Namespace) -> EFRAPConfig:
    """EFRAPConfig from the flags: the defaults (or the paper's, with --reference), then what was given."""
    base = EFRAPConfig.reference() if args.reference else EFRAPConfig()
    given = {
        field: getattr(args, field)
        for field in (
            "iters",
            "lr",
            "batch_size",
            "flip_weight",
            "patience",
            "settle",
            "max_strength",
            "holdout",
            "holdout_choice",
            "unit",
        )
        if getattr(args, field) is not None
    }
    for field in ("budget", "margin_cap"):  # 'off' is a value given: None
        if hasattr(args, field):
            given[field] = getattr(args, field)
    device = getattr(args, "device", None) or "cpu"
    resolve_device(device)  # a clear error before any work, not after the stock quantization
    given.update(calib_size=args.calib_size, objective=args.objective, seed=args.seed, device=device)
    try:
        return EFRAPConfig.from_flags(given, base)
    except EFRAPError as exc:
        raise UsageError(str(exc)) from None


def cmd_defend(args: argparse.Namespace) -> dict[str, Any]:
    onnx_adapter = adapter("onnx")
    src, out = Path(args.model), Path(args.out)
    plan_path = Path(args.plan) if args.plan else None
    if src.suffix != ".onnx":
        raise EFRAPError(f"model: `efrap defend` takes a float .onnx file, got {src.name!r}")
    calib_path = None if args.calib in ("digits", "fashion-mnist") else Path(args.calib)
    _distinct_paths({"the model": src, "--calib": calib_path, "--out": out, "--plan": plan_path})
    check_writable(out, "--out")
    if plan_path is not None:
        check_writable(plan_path, "--plan")
    config = _config(args)
    model = onnx_adapter.prepare(src)  # read, checked, pre-processed once: the scan and the defense take it
    calib = calibration_inputs(args.calib, inputs_needed(config), onnx_adapter.input_names(model.model))
    # the float model's scan, read before anything is written
    crowded = crowded_layers(
        scan_weights(
            onnx_adapter.folded_weights(model), QuantScheme.onnxruntime(args.bits, not args.per_tensor)
        )
    )
    start = time.perf_counter()
    with staged(out) as out_tmp, staged(plan_path) as plan_tmp:
        plan = onnx_adapter.quantize_images(
            model,
            out_tmp,
            calib,
            args.bits,
            per_channel=not args.per_tensor,
            reduce_range=args.reduce_range,
            config=config,
            progress=not args.quiet,
        )
        seconds = time.perf_counter() - start
        report = onnx_adapter.verify(out_tmp, plan, inputs=calib, float_model=model.model)
        if plan_tmp is not None:
            plan.save(plan_tmp)
    summary = {
        "model": str(src),
        "out": str(out),
        "bits": args.bits,
        "reduce_range": args.reduce_range,
        "layers": len(plan.layers),
        "flipped_share": round(plan.flipped_share, 4),
        "seconds": round(seconds, 2),
        "per_layer": {k: round(v.stats["flipped_share"], 4) for k, v in plan.layers.items()},
        "budget": config.budget,
        "disagreement": None if plan.disagreement is None else round(plan.disagreement, 2),
        "margin_cap": None if config.budget is None else config.margin_cap,
        "margin_risk": None if plan.margin_risk is None else round(plan.margin_risk, 2),
        "held_out_resolution": None if plan.resolution is None else round(plan.resolution, 4),
        "held_out_choice": None if config.budget is None else config.holdout_choice,
        "strength": {k: v.stats["strength"] for k, v in plan.layers.items() if "strength" in v.stats},
        "skipped": dict(plan.meta.skipped),
        "constants": dict(plan.meta.constants),
        "verify": report.to_dict(),
        "kernel_agreement": report.kernels.to_dict(),
        "crowded_layers": crowded,
    }
    if not args.json:
        _say_defended(summary, report.int_kernels)
        print(f"kernels: {report.kernels.summary()}")
    return summary


def _say_defended(summary: dict[str, Any], kernels: dict[str, int]) -> None:
    print(
        f"wrote {summary['out']}: {summary['layers']} layers, {100 * summary['flipped_share']:.1f}% of weights "
        f"flipped, {summary['seconds']:.1f} s"
    )
    if summary["budget"] is not None:
        strengths = ", ".join(f"{s:g}" for s in summary["strength"].values())
        held = {"boundary": "nearest the float model's decision boundaries", "last": "the last given"}
        print(
            f"budget: {summary['disagreement']:.2f}% of held-out images ({held[summary['held_out_choice']]}; "
            f"one image: {summary['held_out_resolution']:.2f}%) disagree with the float model's top-1, "
            f"flipping adding at most {summary['budget']:g}% to quantization's own; flipped shares per layer: "
            f"{strengths}"
        )
        cap = "no cap" if summary["margin_cap"] is None else f"cap {summary['margin_cap']:g}%"
        print(
            f"margin risk: {summary['margin_risk']:.2f}% of held-out images lose half their float margin ({cap})"
        )
    for name, reason in summary["skipped"].items():
        print(f"not defended: {name}: {reason}")
    if summary["constants"]:
        print(
            f"{len(summary['constants'])} quantized constants that are no layer's weight (biases added, norm "
            "scales, tables) keep onnxruntime's rounding (--json lists them)"
        )
    ran = ", ".join(f"{k} x{v}" for k, v in kernels.items()) or "none"
    ok = summary["verify"]["integers_ok"]
    print(f"verify: integers {'match the plan' if ok else 'DIFFER'}; onnxruntime runs {ran}")
    if summary["crowded_layers"]:
        print(
            f"scan: in {len(summary['crowded_layers'])} of {summary['layers']} layers the float weights crowd "
            "the rounding boundaries of this grid, PQBackdoor's fingerprint (`efrap scan` for the table)"
        )


# ----- efrap scan ------------------------------------------------------------------------------
def cmd_scan(args: argparse.Namespace) -> dict[str, Any]:
    path = Path(args.model)
    scheme = scheme_preset(args.scheme, args.bits)
    if path.suffix == ".onnx":
        onnx_adapter = adapter("onnx")
        model = onnx_adapter.prepare(path)
        # the scan reads the weights quantize_static would quantize; a model onnxruntime cannot load has
        # none (and its pre-processing folded no BatchNorm): refused, not scanned
        onnx_adapter.session(model.model)
        weights = onnx_adapter.folded_weights(model)
    elif path.suffix == ".safetensors":
        prepared = prepare_model(load_model(path)[0], scheme)
        layers = quantizable_layers(prepared, conv_transpose=scheme.learns_conv_transpose)
        weights = {n: core_weight(m) for n, m in layers}  # output channels first, as the grid runs
    else:
        raise EFRAPError(f"model: expected a .onnx or .safetensors file, got {path.name!r}")
    rows = scan_weights(weights, scheme)
    if not args.json:
        print(format_scan(rows))
    return {
        "model": str(path),
        "scheme": scheme.to_dict(),
        "layers": [r.to_dict() for r in rows],
        "crowded_layers": crowded_layers(rows),
    }


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from .demo import run_demo

    return run_demo(args)


COMMANDS = {
    "attack": cmd_attack,
    "evaluate": cmd_evaluate,
    "defend": cmd_defend,
    "scan": cmd_scan,
    "demo": cmd_demo,
}
