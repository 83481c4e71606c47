"""How EFRAP's cost grows with the model: ResNet-18 (CIFAR stem), MobileNetV2, a transformer encoder and
a Conv1d sequence model, defended through onnxruntime (the quantize_static drop-in) and through PT2E
(defend_prepared), integers verified on the real artifact.

Each model runs in its own process (peak resident memory is the process's). Each path is warmed up
once, then timed at two step counts; the slope is the cost of one step summed over the layers, the intercept the capture and
set-up, and the default (1,000 steps) and the reference (10,000) are extrapolated from them. Models are
randomly initialised and calibrated on random inputs: speed and memory do not depend on training.

    python benchmarks/scale.py --out benchmarks/results
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


def _model(name: str) -> torch.nn.Module:
    from efrap_plugin import TokenEncoder, build_model

    torch.manual_seed(0)
    options, shape = MODELS[name]
    model = TokenEncoder() if name == "token-encoder" else build_model(**options)
    with torch.no_grad():  # BatchNorm statistics as a trained model would have
        model.train()
        model(torch.rand(64, *shape))
    return model.eval()


def _onnx(model: torch.nn.Module, calib: torch.Tensor, steps: int, tmp: Path) -> tuple[float, int, bool]:
    from efrap_onnx import ListDataReader, export_float_onnx, quantize_static, verify
    from efrap_plugin import EFRAPConfig

    src = export_float_onnx(model, calib[:2], tmp / "float.onnx")
    start = time.perf_counter()
    plan = quantize_static(
        src,
        tmp / "efrap.onnx",
        ListDataReader.from_array("input", calib.numpy()),
        per_channel=True,
        config=EFRAPConfig(iters=steps, calib_size=CALIB),
        progress=False,
    )
    seconds = time.perf_counter() - start
    return seconds, len(plan.layers), verify(tmp / "efrap.onnx", plan).integers_ok


def _pt2e(model: torch.nn.Module, calib: torch.Tensor, steps: int, tmp: Path) -> tuple[float, int, bool]:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from efrap_plugin import EFRAPConfig
    from efrap_torchao import defend_prepared, verify_pt2e

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    exported = torch.export.export(
        model, (calib[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    ).module()
    prepared = prepare_pt2e(exported, quantizer)
    for batch in calib.split(64):
        prepared(batch)
    start = time.perf_counter()
    plan = defend_prepared(prepared, calib, EFRAPConfig(iters=steps, calib_size=CALIB), progress=False)
    seconds = time.perf_counter() - start
    return seconds, len(plan.layers), verify_pt2e(convert_pt2e(prepared), plan, strict=False).integers_ok


def measure(name: str) -> list[dict]:
    """One model, both paths, in this process."""
    warnings.simplefilter("ignore")
    model = _model(name)
    calib = torch.rand(CALIB, *MODELS[name][1])
    rows = []
    for path, run in (("onnxruntime", _onnx), ("pt2e", _pt2e)):
        timings = []
        with tempfile.TemporaryDirectory() as tmp:
            run(model, calib, STEPS[0], Path(tmp))  # warm-up: first-call costs stay out of the fit
        for steps in STEPS:
            with tempfile.TemporaryDirectory() as tmp:
                seconds, layers, ok = run(model, calib, steps, Path(tmp))
            timings.append(seconds)
        per_step = (timings[1] - timings[0]) / (STEPS[1] - STEPS[0])  # summed over the layers
        setup = timings[0] - per_step * STEPS[0]
        rows.append(
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
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one model, JSON out
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    from efrap_cli.report import write_table

    rows = []
    for name in args.models:
        out = subprocess.run(
            [sys.executable, __file__, "--one", name], capture_output=True, text=True, check=True, cwd=ROOT
        )
        rows += json.loads(out.stdout.strip().splitlines()[-1])
        print(rows[-2:], flush=True)
    note = (
        f"2-core CPU. Calibration {CALIB} random inputs; timed at {STEPS[0]} and {STEPS[1]} steps per layer, "
        "default (1,000) and reference (10,000) extrapolated linearly; setup = capture of every layer's "
        "inputs and targets plus onnxruntime's / torchao's own quantization. Peak RSS of the process that "
        "ran the model's two paths. integers_ok: read back from the real artifact."
    )
    write_table(args.out, "scale", rows, note)


if __name__ == "__main__":
    main()
