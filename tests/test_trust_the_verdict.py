"""The verdict can be trusted: verify fails a tampered artifact, and bad values are refused at the
boundary with the library's error instead of reaching a plan.

Each tamper starts from one defended QDQ file and changes what decides a weight's dequantized value
(zero point, the scale a node actually reads, the channel axis); each bad value is one a careless or
hostile caller passes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from efrap_onnx import ListDataReader, quantize_static, verify
from efrap_plugin import EFRAPConfig, EFRAPError, ModelError, PlanMismatchError, RoundingPlan

FAST = EFRAPConfig(iters=40, calib_size=256, budget=None)


@pytest.fixture(scope="module")
def defended(pq8_onnx, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "d.onnx"
    reader = ListDataReader.from_array("input", calib[:256])
    plan = quantize_static(pq8_onnx, out, reader, per_channel=True, config=FAST, progress=False)
    assert verify(out, plan).integers_ok
    return out, plan


def _tampered(path, tmp_path, change) -> str:
    model = onnx.load(str(path))
    change(model)
    out = tmp_path / "tampered.onnx"
    onnx.save(model, str(out))
    return str(out)


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _weight_dq(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")
    )


def test_verify_fails_a_moved_weight_zero_point(defended, tmp_path):
    path, plan = defended

    def move(model):
        zp = _init(model, _weight_dq(model).input[2])
        zp.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(zp) + np.int8(3), zp.name))

    report = verify(_tampered(path, tmp_path, move), plan, strict=False)
    assert not report.integers_ok and len(report.zero_point_mismatches) == 1
    with pytest.raises(PlanMismatchError, match="zero point mismatches"):
        verify(_tampered(path, tmp_path, move), plan)


def test_verify_follows_the_scale_the_node_reads_not_the_name_in_the_plan(defended, tmp_path):
    """The DequantizeLinear rewired to a new scale initializer (x4): the plan's named scale is untouched."""
    path, plan = defended

    def rewire(model):
        dq = _weight_dq(model)
        scale = numpy_helper.to_array(_init(model, dq.input[1])) * np.float32(4)
        model.graph.initializer.append(numpy_helper.from_array(scale, "rewired_scale"))
        dq.input[1] = "rewired_scale"

    report = verify(_tampered(path, tmp_path, rewire), plan, strict=False)
    assert not report.integers_ok and len(report.scale_mismatches) == 1


def test_verify_fails_scales_along_another_axis(defended, tmp_path):
    path, plan = defended

    def turn(model):
        dq = _weight_dq(model)
        for a in dq.attribute:
            if a.name == "axis":
                a.i = 1
        if not any(a.name == "axis" for a in dq.attribute):
            dq.attribute.append(onnx.helper.make_attribute("axis", 1))

    report = verify(_tampered(path, tmp_path, turn), plan, strict=False)
    assert not report.integers_ok and any("axis 1" in v for v in report.grid_mismatches.values())


def test_an_untouched_file_still_verifies(defended):
    path, plan = defended
    report = verify(path, plan)
    assert report.integers_ok and not report.zero_point_mismatches and report.matching == len(plan.layers)


@pytest.mark.parametrize(
    "field, value",
    [
        ("flip_weight", math.nan),
        ("lr", math.inf),
        ("beta", math.inf),
        ("round_weight", -math.inf),
        ("seed", "7"),
        ("settle", math.nan),
        ("budget", math.nan),
    ],
)
def test_config_refuses_values_that_are_no_finite_number(field, value):
    with pytest.raises(EFRAPError, match=f"EFRAPConfig.{field}"):
        EFRAPConfig(**{field: value})


def test_config_from_json_refuses_a_seed_given_as_text():
    with pytest.raises(EFRAPError, match="seed"):
        EFRAPConfig.from_json('{"seed": "7"}')


def test_the_cli_refuses_a_nan_flip_weight(pq8_onnx, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "efrap_cli.main", "defend", str(pq8_onnx), "--calib", "digits",
         "--out", str(tmp_path / "d.onnx"), "--flip-weight", "nan", "--budget", "off", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0 and "flip_weight" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "d.onnx").exists()


def test_a_layer_whose_loss_is_not_finite_stops_the_run_by_name(clean_cnn, digits):
    from efrap_plugin import defend

    huge = digits.train.x[:64] * 1e30  # squares to infinity in float32
    with pytest.raises(EFRAPError, match=r"layer '.*': the objective is not finite"):
        defend(clean_cnn, huge, config=FAST.replace(calib_size=64), progress=False)


def _saved_plan(plan: RoundingPlan, tmp_path, **changes) -> str:
    name = next(iter(plan.layers))
    layers = dict(plan.layers)
    layers[name] = type(layers[name])(**{**layers[name].__dict__, **changes})
    path = tmp_path / "plan.safetensors"
    RoundingPlan(plan.scheme, layers, plan.source, plan.meta).save(path)
    return str(path)


@pytest.mark.parametrize(
    "what, change, message",
    [
        ("off the grid", lambda lp: {"integers": lp.integers.clone().fill_(1000)}, "off its grid"),
        ("fractional", lambda lp: {"integers": lp.integers.to(torch.float32) + 0.5}, "not whole numbers"),
        ("nan scale", lambda lp: {"scale": torch.full_like(lp.scale, math.nan)}, "finite and positive"),
        ("negative scale", lambda lp: {"scale": -lp.scale}, "finite and positive"),
        ("one scale", lambda lp: {"scale": lp.scale[:1], "zero_point": lp.zero_point[:1]}, "one scale"),
    ],
)
def test_a_plan_with_unusable_values_is_refused_on_load(defended, tmp_path, what, change, message):
    _, plan = defended
    lp = next(iter(plan.layers.values()))
    path = _saved_plan(plan, tmp_path, **change(lp))
    with pytest.raises(ModelError, match=message):
        RoundingPlan.load(path)


def test_a_plan_listing_a_layer_twice_is_refused(defended, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, plan = defended
    path = tmp_path / "plan.safetensors"
    plan.save(path)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    header = json.loads(meta["efrap-plan"])
    header["layers"][1]["name"] = header["layers"][0]["name"]
    save_file(tensors, str(path), metadata={"efrap-plan": json.dumps(header)})
    with pytest.raises(ModelError, match="listed twice"):
        RoundingPlan.load(path)


def test_calibration_batches_are_read_only_as_far_as_needed():
    """An endless generator (or a DataLoader over a large set) is read up to the rows the defense uses."""
    from efrap_plugin import as_calibration

    pulled = []

    def endless():
        while True:
            pulled.append(1)
            yield torch.zeros(16, 1, 8, 8)

    assert tuple(as_calibration(endless(), 40).shape) == (40, 1, 8, 8)
    assert len(pulled) == 3
