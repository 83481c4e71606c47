"""Hostile and careless input: every case is a clear error of ours (exit 1, or 2 for contradicting
arguments), the inputs are never modified, nothing is left behind, and memory stays bounded.

Numbered as in issue #11's findings: 1 data loss, 2 silent wrong verdicts, 3 memory, 4 tracebacks,
5 litter, 6 modes / --json / deterministic plans. The property-based fuzzers at the end feed damaged
ONNX, calibration and plan files to the loaders and accept only the project's own errors.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx_models import conv_model, external, graph_model

from efrap_cli import main
from efrap_onnx import ListDataReader, load_onnx, quantize_static, verify
from efrap_plugin import (
    DataError,
    EFRAPConfig,
    EFRAPError,
    ModelError,
    PlanMismatchError,
    RoundingPlan,
    as_calibration,
    compare_integers,
    defend,
    staged,
)
from efrap_plugin.redteam import load_model

FAST = ["--iters", "10", "--calib-size", "64", "--quiet"]


@pytest.fixture
def work(tmp_path, calib):
    """A folder holding a small float model (conv.onnx) and calibration images (calib.npz)."""
    onnx.save(conv_model(), str(tmp_path / "conv.onnx"))
    np.savez(tmp_path / "calib.npz", x=calib[:64])
    return tmp_path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _defend(work, *args: str) -> int:
    return main(["defend", str(work / "conv.onnx"), "--calib", str(work / "calib.npz"), *FAST, *args])


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ----- 1. data loss -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "out, plan, clash",
    [
        ("conv.onnx", None, "--out: .*conv.onnx is the same file as the model"),
        ("calib.npz", None, "--out: .*calib.npz is the same file as --calib"),
        ("d.onnx", "conv.onnx", "--plan: .*conv.onnx is the same file as the model"),
        ("d.onnx", "d.onnx", "--plan: .*d.onnx is the same file as --out"),
    ],
)
def test_an_output_naming_an_input_or_another_output_is_refused(work, capsys, out, plan, clash):
    before = _snapshot(work)
    args = ["--out", str(work / out)] + (["--plan", str(work / plan)] if plan else [])
    assert _defend(work, *args) == 2
    assert re.search(clash, _error(capsys))
    assert _snapshot(work) == before


def test_a_hard_link_to_the_model_is_the_same_file(work, capsys):
    os.link(work / "conv.onnx", work / "alias.onnx")
    before = _snapshot(work)
    assert _defend(work, "--out", str(work / "alias.onnx")) == 2
    assert "is the same file as the model" in _error(capsys)
    assert _snapshot(work) == before


# ----- 2. no silent wrong verdict ---------------------------------------------------------------
@pytest.fixture(scope="module")
def defended_conv(tmp_path_factory, calib):
    folder = tmp_path_factory.mktemp("verify")
    onnx.save(conv_model(), str(folder / "conv.onnx"))
    reader = ListDataReader.from_array("input", calib[:64])
    plan = quantize_static(folder / "conv.onnx", folder / "d.onnx", reader, config=EFRAPConfig(iters=10))
    quantize_static(
        folder / "conv.onnx",
        folder / "stock.onnx",
        ListDataReader.from_array("input", calib[:64]),
        efrap=False,
    )
    return folder, plan


def test_verify_with_an_empty_plan_fails(defended_conv):
    folder, plan = defended_conv
    empty = RoundingPlan(plan.scheme, {}, "onnx", plan.meta.replace(layout={}))
    report = verify(folder / "stock.onnx", empty, strict=False)
    assert not report.integers_ok and report.unplanned == ["w_quantized"]
    with pytest.raises(PlanMismatchError, match=r"the plan holds no layer, so it proves nothing"):
        verify(folder / "stock.onnx", empty)


def test_verify_fails_on_a_quantized_layer_the_plan_lacks(defended_conv, tmp_path):
    folder, plan = defended_conv
    model = onnx.load(str(folder / "d.onnx"))
    extra = numpy_helper.from_array(np.ones((2, 144), np.int8), "extra_quantized")
    model.graph.initializer.extend(
        [
            extra,
            numpy_helper.from_array(np.ones(2, np.float32), "extra_scale"),
            numpy_helper.from_array(np.ones((2,), np.float32), "extra_bias"),
        ]
    )
    model.graph.node.extend(
        [
            helper.make_node("DequantizeLinear", ["extra_quantized", "extra_scale"], ["extra_w"], axis=0),
            helper.make_node("Gemm", ["logits", "extra_w", "extra_bias"], ["head"], transB=1),
        ]
    )
    model.graph.output.append(helper.make_tensor_value_info("head", TensorProto.FLOAT, ["N", 2]))
    onnx.save(model, str(tmp_path / "more.onnx"))
    with pytest.raises(PlanMismatchError, match=r"quantized layers the plan lacks \['extra_quantized'\]"):
        verify(tmp_path / "more.onnx", plan)
    assert verify(folder / "d.onnx", plan).integers_ok  # the unchanged file still passes


def test_verify_fails_when_the_plan_names_a_layer_the_file_lacks(defended_conv):
    folder, plan = defended_conv
    ghost = {**plan.layers, "ghost": next(iter(plan.layers.values()))}
    layout = {**plan.meta.layout, "ghost": {**plan.meta.layout["w"], "quantized": "ghost_q"}}
    report = verify(
        folder / "d.onnx", RoundingPlan(plan.scheme, ghost, "onnx", {"layout": layout}), strict=False
    )
    assert not report.integers_ok and report.mismatched == {"ghost": -1}


def test_compare_integers_with_nothing_on_either_side_is_not_a_pass(defended_conv):
    _, plan = defended_conv
    report = compare_integers(RoundingPlan(plan.scheme, {}), {}, strict=False)
    assert report.layers == 0 and not report.integers_ok


# ----- 3. memory ------------------------------------------------------------------------------------
def _peak_bytes(fn) -> int:
    """Peak bytes allocated (numpy and torch CPU tensors report to tracemalloc) while ``fn`` runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _refusal_peak(fn, error: type[Exception], match: str) -> int:
    """Peak bytes allocated while ``fn`` is refused with ``error`` matching ``match``."""

    def refused():
        with pytest.raises(error, match=match):
            fn()

    return _peak_bytes(refused)


def test_an_unused_huge_array_in_the_npz_is_never_inflated(tmp_path, calib):
    path = tmp_path / "calib.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w") as fh:
            np.lib.format.write_array(fh, calib[:64])
        with zf.open("junk.npy", "w", force_zip64=True) as fh:  # 1 GiB of zeros, about 1 MB on disk
            np.lib.format.write_array_header_1_0(
                fh, {"descr": "|u1", "fortran_order": False, "shape": (1 << 30,)}
            )
            chunk = bytes(1 << 24)
            for _ in range(64):
                fh.write(chunk)
    assert path.stat().st_size < 8 << 20
    peak = _peak_bytes(lambda: as_calibration(path, 64))
    assert peak < 16 << 20


def _npz_with_header(path: Path, shape: tuple, payload: bytes = b"") -> Path:
    with zipfile.ZipFile(path, "w") as zf, zf.open("x.npy", "w") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": shape})
        fh.write(payload)
    return path


def test_an_npz_header_declaring_a_huge_array_is_refused_before_allocating(tmp_path):
    path = _npz_with_header(tmp_path / "a.npz", (2, 1, 1 << 20, 1 << 20))
    huge = r"\(2, 1, 1048576, 1048576\) float32 would take 8192.0 GiB \(the limit is 4 GiB\)"
    assert _refusal_peak(lambda: as_calibration(path, 1024), DataError, huge) < 1 << 20
    path = _npz_with_header(tmp_path / "b.npz", (10**12, 1, 8, 8), bytes(256))
    short = r"header declares \(1000000000000, 1, 8, 8\) float32, the file holds fewer bytes"
    assert _refusal_peak(lambda: as_calibration(path, 1024), DataError, short) < 1 << 20


def test_a_tiny_safetensors_declaring_a_huge_architecture_is_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "huge.safetensors"
    arch = {"name": "resnet20", "in_channels": 3, "num_classes": 10, "width": 1 << 20}
    save_file({"stem.0.weight": torch.zeros(1)}, str(path), metadata={"arch": json.dumps(arch)})
    assert path.stat().st_size < 400
    assert main(["scan", str(path)]) == 1
    assert "does not match architecture" in _error(capsys)
    assert (
        _refusal_peak(lambda: load_model(path), ModelError, r"tensors \[.*\] differ in name or shape")
        < 1 << 20
    )


def test_a_graph_that_asks_for_64_gib_is_refused(work, capsys):
    shape = numpy_helper.from_array(np.array([1, 1024, 1024, 16384], np.int64))
    nodes = (
        helper.make_node("Constant", [], ["shape"], value=shape),
        helper.make_node("ConstantOfShape", ["shape"], ["big"]),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        helper.make_node("Add", ["r", "s"], ["r2"]),
    )
    onnx.save(conv_model(extra_nodes=nodes), str(work / "conv.onnx"))
    assert _defend(work, "--out", str(work / "d.onnx")) == 1
    assert "tensor 'big' would take 64.0 GiB at batch 1" in _error(capsys)
    assert not (work / "d.onnx").exists()


# ----- 4. clear errors, never a traceback ---------------------------------------------------------
def _refused(work, capsys, message: str, out: str = "d.onnx") -> None:
    before = _snapshot(work)
    assert _defend(work, "--out", str(work / out)) == 1
    assert message in _error(capsys)
    assert _snapshot(work) == before  # inputs untouched, nothing written


def _external_model(work, location: str, **fields: int) -> None:
    model = conv_model()
    external(model.graph.initializer[0], location, **fields)
    onnx.save(model, str(work / "conv.onnx"))


def test_external_data_past_the_end_of_its_file(work, capsys):
    (work / "w.bin").write_bytes(bytes(100))
    _external_model(work, "w.bin", offset=0, length=144)
    _refused(work, capsys, "offset 0 + length 144 reaches past the end of the file (100 bytes)")


def test_external_data_without_a_length_past_the_end(work, capsys):
    (work / "w.bin").write_bytes(bytes(100))
    _external_model(work, "w.bin", offset=64)
    _refused(work, capsys, "offset 64 + length 144 reaches past the end of the file")


@pytest.mark.parametrize("location", ["w\0.bin", "x" * 300, "a/" * 2100 + "w.bin"])
def test_external_data_with_an_unusable_file_name(work, capsys, location):
    _external_model(work, location)
    _refused(work, capsys, "not a usable file name")


def test_external_data_through_a_symlink_loop(work, capsys):
    os.symlink(work / "loop.bin", work / "loop.bin")
    _external_model(work, "loop.bin")
    _refused(work, capsys, "cannot be opened in")


def test_external_data_through_a_symlink_out_of_the_folder(work, capsys, tmp_path_factory):
    secret = tmp_path_factory.mktemp("elsewhere") / "secret.bin"
    secret.write_bytes(bytes(144))
    os.symlink(secret, work / "w.bin")
    _external_model(work, "w.bin")
    _refused(work, capsys, "outside the model's folder")


def test_external_data_with_an_absolute_path(work, capsys):
    _external_model(work, "/etc/hostname")
    _refused(work, capsys, "outside the model's folder")


def test_external_data_in_a_constant_nodes_attribute(work, capsys):
    (work.parent / "secret.bin").write_bytes(bytes(16))
    value = external(numpy_helper.from_array(np.zeros(4, np.float32), "c"), "../secret.bin")
    nodes = (
        helper.make_node("Constant", [], ["k"], value=value),
        helper.make_node("ReduceSum", ["k"], ["s"], keepdims=0),
        helper.make_node("Add", ["r", "s"], ["r2"]),
    )
    onnx.save(conv_model(extra_nodes=nodes), str(work / "conv.onnx"))
    _refused(work, capsys, "outside the model's folder")


def test_an_opset_newer_than_onnxruntime_knows(work, capsys):
    onnx.save(conv_model(opset=29), str(work / "conv.onnx"))
    _refused(work, capsys, f"onnxruntime {__import__('onnxruntime').__version__} cannot run it")


def test_an_opset_too_old_to_quantize(work, capsys):
    onnx.save(conv_model(opset=9), str(work / "conv.onnx"))
    _refused(work, capsys, "uses ai.onnx opset 9; quantization needs opset >= 10")


def _defend_process(work: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`efrap defend` on work's model in a process of its own, run from ``cwd``: what a user's terminal
    shows, with no test harness catching log records on the way."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "efrap_cli.main",
            "defend",
            str(work / "conv.onnx"),
            "--calib",
            str(work / "calib.npz"),
            "--out",
            str(work / "d.onnx"),
            *FAST,
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_custom_domain_ops_are_refused_and_leave_nothing_in_the_working_folder(work, calib):
    custom = (helper.make_node("Mystery", ["r"], ["r2"], domain="my.ops"),)
    onnx.save(conv_model(extra_nodes=custom, domains=("my.ops",)), str(work / "conv.onnx"))
    cwd = work / "cwd"
    cwd.mkdir()
    out = _defend_process(work, cwd)
    assert out.returncode == 1 and "uses ops of custom domains ['my.ops']" in out.stderr
    assert "Traceback" not in out.stderr and list(cwd.iterdir()) == [] and not (work / "d.onnx").exists()


def test_a_model_with_a_fixed_batch_of_one_is_defended(work, capsys):
    onnx.save(conv_model(batch=1), str(work / "conv.onnx"))
    assert _defend(work, "--out", str(work / "d.onnx"), "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == 1 and summary["verify"]["integers_ok"]


def test_an_input_declaring_a_zero_dimension_is_refused(work, capsys):
    onnx.save(conv_model(batch=0), str(work / "conv.onnx"))
    _refused(work, capsys, "model: input 'input' declares a dimension of size 0 ([0, 1, 8, 8])")


def test_a_weight_with_no_elements_is_refused(work, capsys):
    """Found by fuzzing `efrap defend`: a 0 x 1 x 3 x 3 conv weight (padded, so onnxruntime quantizes
    it) reached the scan's reshape."""
    model = conv_model(weight=np.zeros((0, 1, 3, 3), np.float32))
    model.graph.node[0].attribute.append(helper.make_attribute("pads", [5, 5, 5, 5]))
    onnx.save(model, str(work / "conv.onnx"))
    _refused(work, capsys, "weight 'w': shape (0, 1, 3, 3) has no elements, so there is nothing to quantize")


def test_an_input_whose_rank_does_not_fit_its_conv_names_the_node(work, capsys):
    """onnxruntime's pre-processing fails with an AssertionError and no message; ONNX's strict shape
    inference says which node and why."""
    model = conv_model()
    del model.graph.input[0].type.tensor_type.shape.dim[-1]  # N x 1 x 8 for a 2-D conv
    onnx.save(model, str(work / "conv.onnx"))
    _refused(
        work,
        capsys,
        "cannot prepare it (AssertionError, no message); ONNX shape inference finds (op_type:Conv, node "
        "name: conv): [ShapeInferenceError] Number of spatial dimensions in the weight tensor (2) does not "
        "match the number of spatial dimensions in the input tensor (1)",
    )


def test_a_failed_pre_processing_optimisation_is_one_line_not_a_traceback(work):
    """quant_pre_process logs the whole traceback of its failed graph optimisation at ERROR and goes on (an
    int64 input to a Conv): that becomes one warning line, shown once (the model is pre-processed once
    for the scan and the defense; the CLI's logging let no library warning through before), and
    onnxruntime's refusal of the model is the error."""
    model = conv_model()
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    onnx.save(model, str(work / "conv.onnx"))
    before = _snapshot(work)
    out = _defend_process(work, work)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "Model Optimization Failed" not in out.stderr
    assert (
        out.stderr.count("WARNING efrap_onnx.model_io: onnxruntime's quant_pre_process could not optimise")
        == 1
    )
    assert "Type 'tensor(int64)' of input parameter (input) of operator (Conv)" in out.stderr
    assert _snapshot(work) == before


def test_scan_refuses_a_model_onnxruntime_cannot_load(tmp_path, capsys):
    """The scan reads the weights quantize_static would quantize: a model onnxruntime refuses has none,
    and its pre-processing folded nothing, so a table of its raw weights with exit 0 would be a scan
    that saw nothing it names."""
    model = conv_model()
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    onnx.save(model, str(tmp_path / "conv.onnx"))
    assert main(["scan", str(tmp_path / "conv.onnx")]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "layer " not in out
    assert "cannot run it" in err and "Type 'tensor(int64)' of input parameter (input)" in err


def test_a_stock_qdq_model_onnxruntime_cannot_run_is_named(tmp_path, capsys):
    """Found by fuzzing: a Gemm bias of shape 1 x 8 (valid, broadcast) makes onnxruntime's 4-bit
    quantize_static write a DequantizeLinear its own runtime refuses; that is onnxruntime's output, not
    EFRAP's, and the error says so instead of an internal error."""
    model = graph_model(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        ],
        {"x": (TensorProto.FLOAT, ["N", 16])},
        {"y": ["N", 4]},
        {"w": (8, 16), "b": (1, 8), "w2": (8, 4)},
    )
    onnx.save(model, str(tmp_path / "fc.onnx"))
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).random((64, 16), dtype=np.float32))
    args = ["defend", str(tmp_path / "fc.onnx"), "--calib", str(tmp_path / "calib.npz"), *FAST]
    assert main([*args, "--out", str(tmp_path / "d.onnx"), "--bits", "4"]) == 1
    err = _error(capsys)
    assert (
        "model: the QDQ model onnxruntime's quantize_static wrote (its stock output, before any EFRAP "
        "rounding) does not run in onnxruntime"
    ) in err
    assert "running DequantizeLinear node. Name:'b_DequantizeLinear'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "fc.onnx"]


def test_a_plan_with_bad_json_or_a_missing_tensor(defended_conv, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, plan = defended_conv
    plan.save(tmp_path / "plan.safetensors")
    tensors = load_file(str(tmp_path / "plan.safetensors"))
    with safe_open(str(tmp_path / "plan.safetensors"), framework="pt") as f:
        header = f.metadata()
    save_file(tensors, str(tmp_path / "bad-json.safetensors"), metadata={"efrap-plan": "[{not json"})
    with pytest.raises(ModelError, match=r"its header is not valid plan JSON"):
        RoundingPlan.load(tmp_path / "bad-json.safetensors")
    del tensors["layer0.nearest"]
    save_file(tensors, str(tmp_path / "missing.safetensors"), metadata=header)
    with pytest.raises(ModelError, match=r"entry or tensor 'layer0.nearest' is missing"):
        RoundingPlan.load(tmp_path / "missing.safetensors")


def test_out_in_a_folder_that_cannot_be_written(work, capsys):
    (work / "afile").write_text("")
    _refused(work, capsys, "afile is not a folder", out="afile/d.onnx")
    before = _snapshot(work)
    assert _defend(work, "--out", "/proc/efrap/d.onnx") == 1
    assert "cannot create a file in /proc" in _error(capsys)
    assert _snapshot(work) == before


def test_out_that_is_a_folder(work, capsys):
    (work / "folder.onnx").mkdir()
    assert _defend(work, "--out", str(work / "folder.onnx")) == 1
    assert "is a folder; pass a file path" in _error(capsys)


def test_an_unwritable_plan_is_refused_before_anything_is_written(work, capsys):
    assert _defend(work, "--out", str(work / "d.onnx"), "--plan", "/proc/efrap/plan.safetensors") == 1
    assert "--plan: cannot write" in _error(capsys)
    assert not (work / "d.onnx").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x08\x01\x12junk", "is not a readable ONNX protobuf"),
        (b"", "parsed but holds no graph nodes"),
        (
            helper.make_model(
                helper.make_graph([helper.make_node("Relu", ["a"], ["b"])], "g", [], [])
            ).SerializeToString(),
            "fails the ONNX checker",
        ),
    ],
)
def test_scan_of_a_malformed_model(tmp_path, capsys, content, message):
    (tmp_path / "m.onnx").write_bytes(content)
    assert main(["scan", str(tmp_path / "m.onnx")]) == 1
    assert message in _error(capsys)


@pytest.mark.parametrize(
    "info, message",
    [
        (
            {"dataset": "digits", "trigger": {"size": "big"}},
            "invalid trigger (PatchTrigger.size: expected an integer",
        ),
        (
            {"dataset": "digits", "trigger": {"size": 2, "colour": 1}},
            "invalid trigger (PatchTrigger: expected a dict",
        ),
        ({"dataset": "digits", "trigger": [2, 2]}, "invalid trigger"),
        (
            {"dataset": "cifar-100", "trigger": {"size": 2}},
            "dataset: expected one of ['digits', 'fashion-mnist']",
        ),
        ([1, 2], "holds a JSON list, expected an object"),
    ],
)
def test_evaluate_with_a_bad_attack_info(pq8_onnx, tmp_path, capsys, info, message):
    (tmp_path / "attack.json").write_text(json.dumps(info))
    assert main(["evaluate", str(pq8_onnx), "--attack-info", str(tmp_path / "attack.json")]) == 1
    assert message in _error(capsys)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((4, 1, 8, 8), np.float32)}, "expected an array named 'x'"),
        (
            {"x": np.zeros((4, 1, 8, 8), np.uint8)},
            "expected float images scaled to [0, 1], got dtype torch.uint8",
        ),
        ({"x": np.full((4, 1, 8, 8), np.nan, np.float32)}, "contains NaN or Inf values"),
        ({"x": np.asfortranarray(np.zeros((4, 1, 8, 8), np.float32))}, "stored in Fortran order"),
        (
            {"x": np.zeros((4, 1, 8, 8), np.float32), "y": np.zeros(3, np.int64)},
            "expected one integer label per image",
        ),
        # found by fuzzing efrap defend: a NaN loss and a plan that verified; numpy's IndexError; torch's TypeError
        (
            {"x": np.full((64, 1, 8, 8), 3e38, np.float32)},
            "layer 'w': its float outputs on the calibration data hold NaN or Inf",
        ),
        (
            {"x": np.float32(1.0)},
            "expected a batch of inputs, N x ... (N x D, N x T x D, N x C x L or N x C x H x W), got shape ()",
        ),
        ({"x": np.array(["a"] * 4)}, "calib.npz:x: expected a numeric array, got dtype <U1"),
    ],
)
def test_bad_calibration_files(work, capsys, arrays, message):
    np.savez(work / "calib.npz", **arrays)
    _refused(work, capsys, message)


# ----- 5. litter ------------------------------------------------------------------------------------
def test_sigterm_leaves_nothing_in_the_temp_folder_or_at_out(pq8_onnx, tmp_path):
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir(), cwd.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "efrap_cli.main",
            "defend",
            str(pq8_onnx),
            "--calib",
            "digits",
            "--iters",
            "100000",
            "--out",
            str(cwd / "d.onnx"),
            "--quiet",
        ],
        cwd=cwd,
        env={**os.environ, "TMPDIR": str(tmp)},
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith("efrap-") for p in tmp.iterdir()):
        time.sleep(0.1)  # until the work has started: its temporary folder exists
    assert any(p.name.startswith("efrap-") for p in tmp.iterdir())
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "terminated (SIGTERM)" in err and "Traceback" not in err
    # onnxruntime writes a session-id file (.ses) and torchao makes torch's inductor cache folder on import,
    # on every run, killed or not: the libraries' own persistent files, not this run's work
    assert [
        p.name for p in tmp.iterdir() if p.name != ".ses" and not p.name.startswith("torchinductor_")
    ] == []
    assert list(cwd.iterdir()) == []


def test_a_failure_inside_a_staged_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), staged(tmp_path / "out.onnx") as tmp:
        tmp.write_bytes(b"half a model")
        raise RuntimeError("verification failed")
    assert list(tmp_path.iterdir()) == []
    with staged(tmp_path / "out.onnx") as tmp:
        tmp.write_bytes(b"a model")
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


# ----- 6. modes, --json errors, deterministic plans ---------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_honour_the_umask(work, umask, mode):
    old = os.umask(umask)
    try:
        assert _defend(work, "--out", str(work / "d.onnx"), "--plan", str(work / "p.safetensors")) == 0
    finally:
        os.umask(old)
    assert (work / "d.onnx").stat().st_mode & 0o777 == mode
    assert (work / "p.safetensors").stat().st_mode & 0o777 == mode


def test_json_failure_prints_a_json_error_on_stdout(work, capsys):
    assert _defend(work, "--out", str(work / "conv.onnx"), "--json") == 2
    captured = capsys.readouterr()
    error = json.loads(captured.out)
    assert error["exit_code"] == 2 and error["command"] == "defend" and "same file" in error["error"]


def test_identical_runs_write_identical_plan_bytes(work, clean_cnn, digits, tmp_path):
    config = EFRAPConfig(iters=20, calib_size=64)
    for name in ("a", "b"):
        defend(clean_cnn, digits.train.x, "onnxruntime", config, progress=False).save(tmp_path / f"{name}.st")
    assert (tmp_path / "a.st").read_bytes() == (tmp_path / "b.st").read_bytes()
    for name in ("a", "b"):
        assert _defend(work, "--out", str(work / f"{name}.onnx"), "--plan", str(work / f"{name}.plan")) == 0
    assert (work / "a.plan").read_bytes() == (work / "b.plan").read_bytes()


# ----- property-based fuzz of the loaders -----------------------------------------------------------
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    buf = bytearray(data[: max(cut, 0)] if cut < len(data) else data)
    for pos, value in edits:
        if buf:
            buf[pos % len(buf)] = value
    return bytes(buf)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8)


@FUZZ
@given(edits=EDITS, cut=st.integers(0, 4000))
def test_fuzz_onnx_loader_raises_only_model_errors(tmp_path, edits, cut):
    data = conv_model().SerializeToString()
    path = tmp_path / "fuzz.onnx"
    path.write_bytes(_mutate(data, edits, cut))
    try:
        load_onnx(path)
    except ModelError:
        pass


@FUZZ
@given(edits=EDITS, cut=st.integers(0, 3000))
def test_fuzz_calibration_loader_raises_only_data_errors(tmp_path, edits, cut):
    path = tmp_path / "fuzz.npz"
    np.savez(path, x=np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32), y=np.arange(4))
    path.write_bytes(_mutate(path.read_bytes(), edits, cut))
    try:
        as_calibration(path, 16)
    except DataError:
        pass


@pytest.fixture(scope="module")
def plan_bytes(defended_conv, tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.safetensors"
    defended_conv[1].save(path)
    return path.read_bytes()


@FUZZ
@given(edits=EDITS, cut=st.integers(0, 4000))
def test_fuzz_plan_loader_raises_only_model_errors(tmp_path, plan_bytes, edits, cut):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(_mutate(plan_bytes, edits, cut))
    try:
        RoundingPlan.load(path)
    except EFRAPError:
        pass


def test_an_initializer_whose_bytes_do_not_match_its_shape_is_a_model_error(tmp_path):
    """The ONNX checker lets a tensor through whose bytes overfill its declared shape, or whose element
    type onnx does not know (the fuzz test found both): the loader names it instead of raising numpy's
    reshape error or onnx's KeyError."""
    from efrap_onnx import load_onnx

    model = conv_model()
    weight = model.graph.initializer[0]
    del weight.dims[:]
    weight.dims.extend([1, 3, 3])  # 9 values declared, 36 stored
    onnx.save(model, str(tmp_path / "short.onnx"))
    with pytest.raises(
        ModelError, match=r"initializer 'w' does not hold the data its type and shape declare"
    ):
        load_onnx(tmp_path / "short.onnx")
    model = conv_model()
    model.graph.initializer[0].data_type = 29  # an element type onnx has no numpy type for (fuzz-found)
    onnx.save(model, str(tmp_path / "unknown.onnx"))
    with pytest.raises(
        ModelError, match=r"initializer 'w' does not hold the data its type and shape declare"
    ):
        load_onnx(tmp_path / "unknown.onnx")
