"""How EFRAP's cost grows with the model: ResNet-18 (CIFAR stem), MobileNetV2, a transformer encoder and
a Conv1d sequence model, defended through onnxruntime (the quantize_static drop-in) and through PT2E
(defend_prepared), integers verified on the real artifact.

Each model runs in its own process (peak resident memory is the process's). Each path is warmed up
once, then timed at two step counts; the slope is the cost of one step summed over the layers, the intercept the capture and
set-up, and the default (1,000 steps) and the reference (10,000) are extrapolated from them. Models are
randomly initialised and calibrated on random inputs: speed and memory do not depend on training.

Per layer (``scale-layers``): one EFRAP step (``learn_rounding``'s, the same in every adapter) against a bare
forward + backward of the layer on the same batch, both as slopes between two step counts, and a least-squares
fit of the step's milliseconds against its floating-point operations.

    python benchmarks/scale.py --out benchmarks/results [--models resnet18 ...] [--parts paths,layers]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name -> (build_model arguments, one calibration sample's shape)
    "resnet18": ({"name": "resnet18", "in_channels": 3}, (3, 32, 32)),
    "mobilenetv2": ({"name": "mobilenetv2", "in_channels": 3}, (3, 32, 32)),
    "token-encoder": ({"name": "token-encoder"}, (8, 8)),
    "sequence-cnn": ({"name": "sequence-cnn", "in_channels": 8}, (8, 64)),
}
STEPS = (10, 50)
CALIB = 256
LAYER_STEPS = (10, 40)  # per-layer timing: the slope between these step counts, the best of REPEATS
TIMED_S, MAX_LAYER_STEPS = 0.25, 2000  # ... the second one raised until the difference lasts TIMED_S
REPEATS = 3


def _model(name: str) -> torch.nn.Module:
    from efrap_plugin.redteam import TokenEncoder, build_model

    torch.manual_seed(0)
    options, shape = MODELS[name]
    model = TokenEncoder() if name == "token-encoder" else build_model(**options)
    with torch.no_grad():  # BatchNorm statistics as a trained model would have
        model.train()
        model(torch.rand(64, *shape))
    return model.eval()


def _onnx(model: torch.nn.Module, calib: torch.Tensor, config, tmp: Path) -> tuple[float, int, bool, int]:
    from efrap_onnx import ListDataReader, export_float_onnx, quantize_static, verify

    src = export_float_onnx(model, calib[:2], tmp / "float.onnx")
    start = time.perf_counter()
    plan = quantize_static(
        src,
        tmp / "efrap.onnx",
        ListDataReader.from_array("input", calib.numpy()),
        per_channel=True,
        config=config,
        progress=False,
    )
    seconds = time.perf_counter() - start
    return seconds, len(plan.layers), verify(tmp / "efrap.onnx", plan).integers_ok, _steps(plan)


def _steps(plan) -> int:
    return sum(lp.stats["steps"] for lp in plan.layers.values())


def _pt2e(model: torch.nn.Module, calib: torch.Tensor, config, tmp: Path) -> tuple[float, int, bool, int]:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from efrap_torchao import defend_prepared, verify_pt2e

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    exported = torch.export.export(
        model, (calib[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    ).module()
    prepared = prepare_pt2e(exported, quantizer)
    for batch in calib.split(64):
        prepared(batch)
    start = time.perf_counter()
    plan = defend_prepared(prepared, calib, config, progress=False)
    seconds = time.perf_counter() - start
    ok = verify_pt2e(convert_pt2e(prepared), plan, strict=False).integers_ok
    return seconds, len(plan.layers), ok, _steps(plan)


PATHS = {"onnxruntime": _onnx, "pt2e": _pt2e}


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0)


def activation_mib(model: torch.nn.Module, calib: torch.Tensor) -> tuple[float, float]:
    """The model's float32 weights, and the largest cached inputs + targets of one layer, in MiB."""
    from efrap_plugin import quantizable_layers

    sizes = []
    hooks = [
        layer.register_forward_hook(lambda _m, inp, out: sizes.append(inp[0][0].numel() + out[0].numel()))
        for _, layer in quantizable_layers(model)
    ]
    with torch.no_grad():
        model(calib[:1])
    for hook in hooks:
        hook.remove()
    model_mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    return model_mib, max(sizes) * calib.shape[0] * 4 / 2**20


def default_run(name: str, path: str) -> list[dict]:
    """The model defended at EFRAPConfig()'s defaults (1,024 calibration inputs) end to end, one path,
    in this process: seconds, optimizer steps, peak memory against model + 2 layers' activations + 1 GiB."""
    from efrap_plugin import EFRAPConfig

    warnings.simplefilter("ignore")
    config = EFRAPConfig()
    model = _model(name)
    calib = torch.rand(config.calib_size, *MODELS[name][1])
    model_mib, layer_mib = activation_mib(model, calib)
    with tempfile.TemporaryDirectory() as tmp:
        seconds, layers, ok, steps = PATHS[path](model, calib, config, Path(tmp))
    peak = _peak_rss_mib()
    bound = model_mib + 2 * layer_mib + 1024
    return [
        {
            "model": name,
            "path": path,
            "calib": config.calib_size,
            "layers": layers,
            "integers_ok": ok,
            "seconds": round(seconds, 0),
            "steps": steps,
            "steps_of_full": round(steps / (layers * config.iters), 3),
            "model_mib": round(model_mib, 0),
            "largest_layer_activations_mib": round(layer_mib, 0),
            "peak_rss_mib": peak,
            "bound_mib": round(bound, 0),
            "within_bound": peak <= bound,
        }
    ]


def _slope_ms(run, steps: tuple[int, int] = LAYER_STEPS) -> float:
    """Milliseconds per step: the best of REPEATS timings at each step count, differenced. The second
    count grows until the difference takes at least TIMED_S (a small layer's 30 steps last a few
    milliseconds, as long as the call's own set-up varies)."""
    low, high = steps
    start = time.perf_counter()
    run(high)
    estimate = (time.perf_counter() - start) / high
    high = max(high, min(MAX_LAYER_STEPS, low + round(TIMED_S / max(estimate, 1e-6))))
    best = []
    for n in (low, high):
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            run(n)
            times.append(time.perf_counter() - start)
        best.append(min(times))
    return 1000 * (best[1] - best[0]) / (high - low)


def _step_costs(problem, config) -> tuple[float, float]:
    """(EFRAP step ms, bare forward + backward ms) of one layer on batches of ``config.batch_size``."""
    from efrap_plugin import learn_rounding

    generator = torch.Generator().manual_seed(0)
    x, y = problem.inputs, problem.targets

    def efrap(n: int) -> None:
        learn_rounding(problem, config.replace(iters=n), generator)

    def bare(n: int) -> None:
        w = problem.weight.clone().requires_grad_(True)
        for _ in range(n):
            idx = torch.randint(0, x.shape[0], (config.batch_size,), generator=generator)
            loss = (problem.forward(x[idx], w) - y[idx]).pow(2).mean()
            w.grad = None
            loss.backward()

    return _slope_ms(efrap), _slope_ms(bare)


def layer_costs(name: str) -> list[dict]:
    """Each layer of the model: an EFRAP step and a bare forward + backward, same batch, same threads."""
    from efrap_plugin import (
        EFRAPConfig,
        LayerProblem,
        capture,
        prepare_model,
        quantizable_layers,
        scheme_preset,
    )
    from efrap_plugin.layers import layer_forward
    from efrap_plugin.loop import step_flops
    from efrap_plugin.threads import threads_for

    warnings.simplefilter("ignore")
    scheme = scheme_preset("onnxruntime", 8)
    model = prepare_model(_model(name), scheme)
    calib = torch.rand(CALIB, *MODELS[name][1])
    config = EFRAPConfig(budget=None, patience=0)
    rows = []
    for layer_name, layer in quantizable_layers(model, calib[:1]):
        x, y = capture(model, layer, calib, "input"), capture(model, layer, calib, "output")
        problem = LayerProblem(layer_name, layer.weight.detach().clone(), scheme, layer_forward(layer), x, y)
        flops = step_flops(problem, config)
        with threads_for(flops):
            efrap_ms, bare_ms = _step_costs(problem, config)
        rows.append(
            {
                "model": name,
                "layer": layer_name,
                "weights": problem.weight.numel(),
                "step_gflop": round(flops / 1e9, 4),
                "efrap_step_ms": round(efrap_ms, 3),
                "bare_step_ms": round(bare_ms, 3),
                "efrap_vs_bare": round(efrap_ms / bare_ms, 2),
            }
        )
    return rows


def fit(rows: list[dict]) -> dict:
    """EFRAP step ms = a + b * GFLOP over a model's layers (least squares), and the ratio's spread."""
    xs = torch.tensor([r["step_gflop"] for r in rows], dtype=torch.float64)
    ys = torch.tensor([r["efrap_step_ms"] for r in rows], dtype=torch.float64)
    design = torch.stack([torch.ones_like(xs), xs], dim=1)
    (a, b) = torch.linalg.lstsq(design, ys[:, None]).solution[:, 0].tolist()
    residual = ys - design @ torch.tensor([a, b], dtype=torch.float64)
    r2 = 1 - float(residual.pow(2).sum() / (ys - ys.mean()).pow(2).sum().clamp_min(1e-12))
    ratios = [r["efrap_vs_bare"] for r in rows]
    weighted = sum(r["efrap_step_ms"] for r in rows) / sum(r["bare_step_ms"] for r in rows)
    return {
        "step_ms_fixed": round(a, 3),
        "step_ms_per_gflop": round(b, 2),
        "fit_r2": round(r2, 3),
        "efrap_vs_bare_all_layers": round(weighted, 2),
        "efrap_vs_bare_max_layer": max(ratios),
    }


def measure(name: str, path: str) -> list[dict]:
    """One model, one path, in this process: two step counts (every step taken), the fit between them."""
    from efrap_plugin import EFRAPConfig

    warnings.simplefilter("ignore")
    model = _model(name)
    calib = torch.rand(CALIB, *MODELS[name][1])
    run = PATHS[path]
    timings = []
    for steps in (STEPS[0], *STEPS):  # the first is a warm-up: first-call costs stay out of the fit
        with tempfile.TemporaryDirectory() as tmp:
            config = EFRAPConfig(budget=None, iters=steps, calib_size=CALIB, patience=0)
            seconds, layers, ok, _ = run(model, calib, config, Path(tmp))
        timings.append(seconds)
    per_step = (timings[2] - timings[1]) / (STEPS[1] - STEPS[0])  # summed over the layers
    setup = timings[1] - per_step * STEPS[0]
    return [
        {
            "model": name,
            "path": path,
            "parameters": sum(p.numel() for p in model.parameters()),
            "layers": layers,
            "integers_ok": ok,
            "setup_s": round(setup, 1),
            "step_ms_all_layers": round(1000 * per_step, 1),
            "default_s": round(setup + 1000 * per_step, 0),
            "reference_s": round(setup + 10_000 * per_step, 0),
            "peak_rss_mib": _peak_rss_mib(),
        }
    ]


def _batch_size() -> int:
    from efrap_plugin import EFRAPConfig

    return EFRAPConfig().batch_size


PARTS = {"paths": measure, "layers": layer_costs, "default": default_run}


def _child(name: str, part: str, path: str = "") -> list[dict]:
    """``part`` of one model (and path) in a fresh process: peak memory is that run's alone."""
    command = [sys.executable, __file__, "--one", name, "--part", part, "--path", path]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    print(found[-1], flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one model, JSON out
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument(
        "--parts",
        default="paths,layers",
        help="paths: both defenses timed at two step counts; layers: per-layer step costs; "
        "default: the defaults end to end (slow: ResNet-18 about 15 minutes a path)",
    )
    args = parser.parse_args()
    if args.one:
        run = PARTS[args.part]
        print(json.dumps(run(args.one) if args.part == "layers" else run(args.one, args.path)))
        return
    from efrap_cli.report import write_table

    parts = args.parts.split(",")
    if "layers" in parts:
        rows = [r for name in args.models for r in _child(name, "layers")]
        note = (
            f"2-core CPU, batch {_batch_size()} of {CALIB} random inputs; milliseconds per step as the slope "
            f"between {LAYER_STEPS[0]} and {LAYER_STEPS[1]} steps, or more until the difference lasts {TIMED_S} s "
            f"(best of {REPEATS}). efrap: learn_rounding's "
            "step (soft weight, L_A + L_F + L_P, backward, Adam); bare: the layer's forward, a squared error, "
            "backward to the weight. step_gflop: 6 x the forward's multiply-adds (forward + backward)."
        )
        write_table(args.out, "scale-layers", rows, note)
        fits = [{"model": m, **fit([r for r in rows if r["model"] == m])} for m in args.models]
        write_table(args.out, "scale-fit", fits, note + " Fit: efrap_step_ms = fixed + per_gflop x GFLOP.")
    if "default" in parts:
        rows = [r for name in args.models for path in PATHS for r in _child(name, "default", path)]
        note = (
            "2-core CPU; EFRAPConfig() as shipped (1,024 random calibration inputs, 1,000 steps per layer), "
            "end to end: onnxruntime's / torchao's own quantization, capture, optimisation. "
            "One process per row; bound_mib: float32 model + 2 x the largest layer's cached inputs + targets + 1 GiB."
        )
        write_table(args.out, "scale-default", rows, note)
    if "paths" in parts:
        rows = [r for name in args.models for path in PATHS for r in _child(name, "paths", path)]
        note = (
            f"2-core CPU. Calibration {CALIB} random inputs; timed at {STEPS[0]} and {STEPS[1]} steps per layer, "
            "default (1,000) and reference (10,000) extrapolated linearly; setup = capture of every layer's "
            "inputs and targets plus onnxruntime's / torchao's own quantization. Peak RSS of the process that "
            "ran the path. integers_ok: read back from the real artifact."
        )
        write_table(args.out, "scale", rows, note)


if __name__ == "__main__":
    main()
