"""What the choice of layer inputs costs inside the user's PT2E flow: each layer's inputs from the
partially quantized model (the reference) or from the float model, on the committed attacked models.

    python benchmarks/torchao_layer_inputs.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from efrap_cli.report import write_table
from efrap_plugin import evaluate, load_digits
from efrap_plugin.attacks import red_team_model
from efrap_torchao import defend_prepared, spec_scheme

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from torchao_pt2e import make_quantizer  # noqa: E402  (the example's quantizer set-up, reused as is)

CELLS = (("x86", "pqbackdoor-x86"), ("xnnpack", "pqbackdoor-ort8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    digits = load_digits(seed=0)
    calib, test = digits.train.x[:1024], digits.test
    rows = []
    for name, fixture in CELLS:
        quantizer, config = make_quantizer(name)
        model, trigger = red_team_model(spec_scheme(config.weight), ROOT / "tests" / "fixtures" / fixture)
        float_m = evaluate(model, test, trigger)
        for inputs in ("quantized", "float"):
            exported = torch.export.export(
                model, (calib[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
            ).module()
            prepared = prepare_pt2e(exported, quantizer)
            for batch in calib.split(64):
                prepared(batch)
            start = time.perf_counter()
            defend_prepared(prepared, calib, layer_inputs=inputs, progress=False)
            seconds = time.perf_counter() - start
            m = evaluate(convert_pt2e(prepared), test, trigger)
            rows.append(
                {
                    "quantizer": name,
                    "model": fixture,
                    "layer_inputs": inputs,
                    "float_acc": round(100 * float_m.clean_acc, 2),
                    "float_asr": round(100 * float_m.asr, 2),
                    "efrap_acc": round(100 * m.clean_acc, 2),
                    "efrap_asr": round(100 * m.asr, 2),
                    "seconds": round(seconds, 1),
                }
            )
    note = (
        "Real int8 models from convert_pt2e after defend_prepared (1,000 steps per layer, 1,024 calibration "
        "images); digits test split; seconds on a 2-core CPU (one thread), compare within a run."
    )
    write_table(args.out, "torchao-layer-inputs", rows, note)


if __name__ == "__main__":
    main()
