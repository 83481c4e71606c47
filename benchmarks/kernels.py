"""What onnxruntime's fused int8 kernels make of the same files on this CPU and on an AVX2-only one:
the committed PQBackdoor int8 fixture quantized stock and defended, through onnxruntime's
quantize_static (plain and reduce_range) and Brevitas' graph flow (QCDQ export), each measured on the
digits test split in the graph's own arithmetic (an unfused session) and in the fused kernels, with
the kernel check's verdict. The AVX2-only CPU is Debian's qemu-user (`qemu-x86_64 -cpu Haswell`), or,
run on a machine that has one, the real thing: ``--keep-other-cpus`` adds this machine's rows to the
table and keeps the rows other CPUs gave.

    python benchmarks/kernels.py --out benchmarks/results
    python benchmarks/kernels.py --out benchmarks/results --no-qemu --keep-other-cpus
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "pqbackdoor-ort8"
KERNELS = ROOT / "adapters" / "efrap_onnx" / "kernels.py"


def _kernels_module():
    """efrap_onnx.kernels loaded by path: onnx, onnxruntime and numpy only, so an emulated process
    starts quickly."""
    spec = importlib.util.spec_from_file_location("efrap_kernels_bench", KERNELS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def measure(data: Path, models: list[str]) -> list[dict]:
    """Each model on the test images, exact and fused, on the CPU this process runs on."""
    kernels = _kernels_module()
    held = np.load(data)
    x, y, xt, yt, target = held["x"], held["y"], held["xt"], held["yt"], int(held["target"])
    rows = []
    for path in models:
        check = kernels.check_kernels(path, held["calib"])
        row = {"model": Path(path).stem, "cpu": check.cpu.describe(), "run": "native"}
        for arithmetic, exact in (("exact", True), ("kernels", False)):
            sess = kernels.kernel_session(path, exact=exact)
            name = sess.get_inputs()[0].name
            clean = sess.run(None, {name: x})[0].argmax(-1)
            triggered = sess.run(None, {name: xt})[0].argmax(-1)
            row[f"{arithmetic}_acc"] = round(100 * float((clean == y).mean()), 2)
            row[f"{arithmetic}_asr"] = round(100 * float((triggered[yt != target] == target).mean()), 2)
        row.update(
            kernel_check_ok=check.ok,
            top1_agreement=round(100 * check.top1_agreement, 2),
            max_error=round(check.max_error, 3),
            diverging_layers=len(check.diverging_layers),
            worst_steps=max((d.max_steps for d in check.layers.values()), default=0),
        )
        rows.append(row)
    return rows


def _earlier_rows(path: Path, replaced: set[tuple[str, str]]) -> list[dict]:
    """The rows an earlier run wrote for other CPUs (rows written before the ``run`` column: an ``x86_64``
    CPU is the emulated one, whose /proc/cpuinfo is not its own)."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        earlier = list(csv.DictReader(f))
    kept = []
    for row in earlier:
        run = row.pop("run", None) or ("qemu Haswell" if row["cpu"].startswith("x86_64") else "native")
        if (row["cpu"], run) not in replaced:
            kept.append({"model": row.pop("model"), "cpu": row.pop("cpu"), "run": run, **row})
    return kept


def build(folder: Path) -> tuple[Path, list[Path]]:
    """The test data (.npz) and the six int8 files: stock and defended, three flows (Brevitas' are
    committed fixtures)."""
    import torch

    from efrap_onnx import quantize_images
    from efrap_plugin.redteam import PatchTrigger, load_digits

    torch.set_num_threads(1)
    digits = load_digits(seed=0)
    calib = digits.train.x[:1024]
    trigger = PatchTrigger.from_dict(json.loads((FIXTURE / "attack.json").read_text())["trigger"])
    triggered = trigger.apply(digits.test.x)
    data = folder / "data.npz"
    np.savez(
        data,
        x=digits.test.x.numpy(),
        y=digits.test.y.numpy(),
        xt=triggered.numpy(),
        yt=digits.test.y.numpy(),
        target=trigger.target,
        calib=calib[:256].numpy(),
    )
    models = []
    for name, reduce_range in (("onnxruntime", False), ("onnxruntime-reduce-range", True)):
        for how, efrap in (("stock", False), ("efrap", True)):
            out = folder / f"{name}-{how}.onnx"
            quantize_images(
                FIXTURE / "model.onnx",
                out,
                calib.numpy(),
                reduce_range=reduce_range,
                efrap=efrap,
                progress=False,
            )
            models.append(out)
    for how in ("", "-efrap"):  # Brevitas' graph flow, exported QCDQ (tests/fixtures/build.py kernels)
        models.append(ROOT / "tests" / "fixtures" / "kernels" / f"brevitas-qcdq-int8{how}.onnx")
    return data, models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-qemu", action="store_true", help="measure on this CPU only")
    parser.add_argument(
        "--keep-other-cpus",
        action="store_true",
        help="keep the rows of kernels.csv that other CPUs gave, replacing only this run's CPUs'",
    )
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)  # DATA MODEL...: the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1:])))
        return
    from efrap_cli.report import write_table

    with tempfile.TemporaryDirectory(prefix="efrap-kernels-") as tmp:
        data, models = build(Path(tmp))
        child = [sys.executable, __file__, "--measure", str(data), *map(str, models)]
        rows = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
        qemu = None if args.no_qemu else shutil.which("qemu-x86_64")
        if qemu is None and not args.no_qemu:
            print("qemu-x86_64 not found (Debian's qemu-user): measured on this CPU only", file=sys.stderr)
        if qemu is not None:
            emulated = subprocess.run(
                [qemu, "-cpu", "Haswell", *child], check=True, capture_output=True, text=True
            )
            rows += [
                {**row, "run": "qemu Haswell"} for row in json.loads(emulated.stdout.strip().splitlines()[-1])
            ]
    if args.keep_other_cpus:
        rows = _earlier_rows(args.out / "kernels.csv", {(row["cpu"], row["run"]) for row in rows}) + rows
    for row in rows:
        print(row, flush=True)
    note = (
        "PQBackdoor int8 fixture (tests/fixtures/pqbackdoor-ort8), digits test split (540 images; asr on the "
        "triggered non-target ones). `exact`: an unfused onnxruntime session, the graph's own QDQ arithmetic, "
        "the same on every CPU; `kernels`: the session onnxruntime deploys, QDQ fused into this CPU's integer "
        "kernels. Kernel check (efrap_onnx.check_kernels) on 256 calibration images: top-1 agreement, largest "
        "output error, layers whose int8 outputs move beyond one step when run alone, and the most steps one "
        "moved. `run`: on the CPU named (native) or under qemu-user's Haswell CPU model (AVX2, no VNNI) on "
        "a machine with the CPU named."
    )
    write_table(args.out, "kernels", rows, note)


if __name__ == "__main__":
    main()
