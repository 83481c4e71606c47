"""A digest of the plan every route learns on the committed PQBackdoor int8 fixture: run it before and after
a refactor of the defense and compare, and the plans are shown bit-identical (or which route moved).

Each digest covers every layer's name, integers and scale, and its statistics to six decimals. Routes:
``defend`` (torch), PT2E (X86Inductor; each ``layer_inputs``), FX (x86 qconfigs), Brevitas (per-channel
int8 quantizers, graph flow) and the onnxruntime drop-in, each with the fixed strength and in budget mode.
Short runs (60 steps a layer): what is compared is the computation, not a defense's quality.

    python benchmarks/plan_digests.py > before.json   # on the old tree, and after.json on the new one
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "pqbackdoor-ort8"
CONFIGS = {
    "fixed": {"iters": 60, "calib_size": 256},
    "budget": {"iters": 60, "calib_size": 200, "budget": 1.0, "holdout": 64},
}


def digest(plan) -> str:
    h = hashlib.sha256()
    for name, lp in plan.layers.items():
        h.update(name.encode())
        h.update(lp.integers.numpy().tobytes())
        h.update(lp.scale.numpy().tobytes())
        h.update(json.dumps({k: round(float(v), 6) for k, v in lp.stats.items()}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _pt2e(model, calib, config, layer_inputs: str):
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from efrap_torchao import defend_prepared

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(model.eval(), (calib[:2],), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(exported, quantizer)
    for x in calib.split(64):
        prepared(x)
    return defend_prepared(prepared, calib, config, layer_inputs=layer_inputs, progress=False)


def _fx(model, calib, config):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    from efrap_torchao import defend_prepared

    prepared = prepare_fx(model.eval(), get_default_qconfig_mapping("x86"), (calib[:1],))
    for x in calib.split(64):
        prepared(x)
    return defend_prepared(prepared, calib, config, progress=False)


def _brevitas(model, calib, config):
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.graph.quantize import COMPUTE_LAYER_MAP, preprocess_for_quantize, quantize
    from brevitas.quant import Int8WeightPerChannelFloat

    from efrap_brevitas import defend_quant_model

    layer_map = dict(COMPUTE_LAYER_MAP)
    for cls in (torch.nn.Conv2d, torch.nn.Linear):
        quant_cls, kwargs = layer_map[cls]
        layer_map[cls] = (quant_cls, {**kwargs, "weight_quant": Int8WeightPerChannelFloat})
    qmodel = quantize(preprocess_for_quantize(model.eval()), compute_layer_map=layer_map)
    with torch.no_grad(), calibration_mode(qmodel):
        for x in calib.split(64):
            qmodel(x)
    return defend_quant_model(qmodel, calib, config, progress=False)


def _onnx(calib, config, out: Path):
    import onnx

    from efrap_onnx import ListDataReader, quantize_static

    src = FIXTURE / "model.onnx"
    reader = ListDataReader.from_array(onnx.load(str(src)).graph.input[0].name, calib.numpy())
    return quantize_static(str(src), out, reader, per_channel=True, config=config, progress=False)


def main() -> None:
    from efrap_plugin import EFRAPConfig, defend
    from efrap_plugin.redteam import load_digits, load_model

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    model, _ = load_model(FIXTURE / "model.safetensors")
    calib = load_digits(seed=0).train.x[:320]
    digests = {}
    with tempfile.TemporaryDirectory(prefix="efrap-digests-") as tmp:
        for name, fields in CONFIGS.items():
            config = EFRAPConfig(**fields)
            digests[f"defend-{name}"] = digest(defend(model, calib, "onnxruntime", config, progress=False))
            for choice in ("mixed", "quantized", "float") if name == "fixed" else ("mixed",):
                plan = _pt2e(copy.deepcopy(model), calib, config, choice)
                digests[f"pt2e-{name}-{choice}"] = digest(plan)
            digests[f"fx-{name}"] = digest(_fx(copy.deepcopy(model), calib, config))
            digests[f"brevitas-{name}"] = digest(_brevitas(copy.deepcopy(model), calib, config))
            digests[f"onnx-{name}"] = digest(_onnx(calib, config, Path(tmp) / f"{name}.onnx"))
    json.dump(digests, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
