"""What the choice of layer inputs costs inside the user's own flow (torchao PT2E, Brevitas): each
layer's inputs from the partially quantized model (the reference), from the float model, or mixed
element by element (QDrop), on the committed attacked models.

    python benchmarks/layer_inputs.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

from efrap_cli.report import write_table
from efrap_plugin import LAYER_INPUTS
from efrap_plugin.redteam import backdoor_removed, evaluate, load_digits
from efrap_plugin.redteam.attacks import red_team_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT / "examples"))

# (flow, the example's option, the committed model attacked at that option's grid)
CELLS = (
    ("pt2e", "x86", "pqbackdoor-x86"),
    ("pt2e", "xnnpack", "pqbackdoor-ort8"),
    ("pt2e", "x86-per-tensor", "pqbackdoor-x86-per-tensor"),
    ("pt2e", "xnnpack-per-tensor", "pqbackdoor-xnnpack-per-tensor"),
    ("brevitas", "int8-per-channel-float", "pqbackdoor-ort8"),
    ("brevitas", "int4-per-channel-float", "pqbackdoor-brevitas-int4-pc"),
    ("brevitas", "int8-per-tensor-fixed-point", "pqbackdoor-brevitas-int8-pt-pot"),
)


def pt2e(option: str, model, calib, inputs: str):
    """The example's PT2E flow, defended with ``inputs``: the converted int8 model and the seconds."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao_pt2e import make_quantizer  # the example's quantizer set-up, reused as is

    from efrap_torchao import defend_prepared

    exported = torch.export.export(
        model, (calib[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    ).module()
    prepared = prepare_pt2e(exported, make_quantizer(option)[0])
    for batch in calib.split(64):
        prepared(batch)
    start = time.perf_counter()
    defend_prepared(prepared, calib, layer_inputs=inputs, progress=False)
    return convert_pt2e(prepared), time.perf_counter() - start


def brevitas(option: str, model, calib, inputs: str):
    """The example's Brevitas flow, defended with ``inputs``: the quantized model and the seconds."""
    from brevitas_ptq import WEIGHT_QUANT, calibrate, quantize_model

    from efrap_brevitas import defend_quant_model

    quantized = quantize_model(model, *WEIGHT_QUANT[option])
    calibrate(calib, quantized)
    start = time.perf_counter()
    defend_quant_model(quantized, calib, layer_inputs=inputs, progress=False)
    return quantized.eval(), time.perf_counter() - start


FLOWS = {"pt2e": pt2e, "brevitas": brevitas}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    digits = load_digits(seed=0)
    calib, test = digits.train.x[:1024], digits.test
    rows = []
    for flow, option, fixture in CELLS:
        model, trigger = red_team_model(None, FIXTURES / fixture)
        float_m = evaluate(model.eval(), test, trigger)
        for inputs in LAYER_INPUTS:
            defended, seconds = FLOWS[flow](option, model, calib, inputs)
            m = evaluate(defended, test, trigger)
            rows.append(
                {
                    "flow": flow,
                    "option": option,
                    "model": fixture,
                    "layer_inputs": inputs,
                    "float_acc": round(100 * float_m.clean_acc, 2),
                    "float_asr": round(100 * float_m.asr, 2),
                    "efrap_acc": round(100 * m.clean_acc, 2),
                    "efrap_asr": round(100 * m.asr, 2),
                    "removed": backdoor_removed(float_m, m),
                    "seconds": round(seconds, 1),
                }
            )
    note = (
        "Real quantized models (convert_pt2e's int8 model; the Brevitas model as quantized, which onnxruntime "
        "runs identically on its QCDQ export) after the one EFRAP call (1,000 steps per layer, 1,024 "
        "calibration images); digits test split; removed: asr <= max(3, float asr + 1) and accuracy within "
        "1 point of float. Seconds on a 2-core CPU (one thread), compare within a run."
    )
    write_table(args.out, "layer-inputs", rows, note)


if __name__ == "__main__":
    main()
