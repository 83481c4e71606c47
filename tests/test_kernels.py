"""The kernel check: onnxruntime's fused int8 kernels against the graph's own QDQ arithmetic.

What is exact on every CPU is asserted here as exact (the exact session against numpy's QDQ arithmetic,
the layers found, the CPU probe's parsing). What the fused kernels do depends on the CPU: on this
machine the check's verdict is asserted against the features it reports, and an AVX2-only CPU is run for
real under qemu-user (`qemu-x86_64 -cpu Haswell`), where onnxruntime's u8 x s8 kernels saturate.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from efrap_onnx import check_kernels, cpu_features, session
from efrap_onnx.kernels import MIN_AGREEMENT

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "kernels"
BREVITAS = FIXTURES / "brevitas-qcdq-int8.onnx"
DROP_IN = FIXTURES / "ort-qdq-int8.onnx"
REDUCED = FIXTURES / "ort-qdq-int8-reduce-range.onnx"
PROBE = Path(__file__).resolve().parent / "kernels_probe.py"


@pytest.fixture(scope="module")
def calib():
    return np.load(FIXTURES / "calib.npy")


def _qdq_linear(w: np.ndarray, x_scale: float, w_scale: np.ndarray, y_scale: float) -> onnx.ModelProto:
    """x -> Q(u8) -> DQ -> Gemm(DQ(s8 w)) -> Q(u8) -> DQ: one quantized layer, written by hand."""
    inits = [
        numpy_helper.from_array(w.astype(np.int8), "w_q"),
        numpy_helper.from_array(np.float32(x_scale), "x_s"),
        numpy_helper.from_array(np.uint8(128), "x_z"),
        numpy_helper.from_array(w_scale.astype(np.float32), "w_s"),
        numpy_helper.from_array(np.zeros(len(w_scale), np.int8), "w_z"),
        numpy_helper.from_array(np.float32(y_scale), "y_s"),
        numpy_helper.from_array(np.uint8(128), "y_z"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wd"], axis=0),
        helper.make_node("Gemm", ["xd", "wd"], ["y"], transB=1, name="fc"),
        helper.make_node("QuantizeLinear", ["y", "y_s", "y_z"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "y_s", "y_z"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w.shape[1]])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, w.shape[0]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_the_exact_session_computes_the_graphs_qdq_arithmetic():
    """On any CPU: the unfused session gives numpy's dequantize -> float Gemm -> quantize, to the step."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (6, 16))
    w_scale, x_scale, y_scale = rng.uniform(0.01, 0.02, 6), 0.02, 0.05
    x = rng.uniform(-2.5, 2.5, (32, 16)).astype(np.float32)
    model = _qdq_linear(w, x_scale, w_scale, y_scale)
    xq = np.clip(np.rint(x / np.float32(x_scale)) + 128, 0, 255)
    y = ((xq - 128) * np.float32(x_scale)).astype(np.float32) @ (w * w_scale[:, None]).astype(np.float32).T
    want = (np.clip(np.rint(y / np.float32(y_scale)) + 128, 0, 255) - 128) * np.float32(y_scale)
    got = session(model, exact=True).run(None, {"x": x})[0]
    assert np.abs(got - want).max() <= y_scale * 1.001  # one step, where float sums round differently
    assert np.mean(np.isclose(got, want)) > 0.99


def test_every_quantized_layer_is_checked_alone_in_a_fused_kernel(calib):
    """Each Conv / Gemm of the Brevitas QCDQ export and of onnxruntime's QDQ output is found, cut out with
    its input and output quantization, and runs fused when alone (so a layer's divergence is its own)."""
    from efrap_onnx.kernels import _layer_segments

    for path, names in (
        (BREVITAS, ["/features.0.0/Conv", "/features.1.0/Conv", "/features.3.0/Conv", "/classifier/Gemm"]),
        (DROP_IN, ["node_Conv_100", "node_Conv_102", "node_Conv_104", "node_linear"]),
    ):
        segments = _layer_segments(onnx.load(str(path)))
        assert list(segments) == names
        check = check_kernels(path, calib[:16])
        assert list(check.layers) == names and check.inputs == 16
        for segment in segments.values():
            optimized = _optimized_ops(segment.model)
            assert {"QLinearConv", "QGemm"} & optimized, (path.name, optimized)


def _optimized_ops(model: onnx.ModelProto) -> set[str]:
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(tmp) / "o.onnx")
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}


def test_on_this_cpu_the_verdict_follows_its_features(calib):
    """A CPU with an int8 dot product (VNNI) computes the graph to the step; one without may saturate,
    and then the check names the layers and the fix."""
    cpu = cpu_features()
    for path in (BREVITAS, DROP_IN, REDUCED):
        check = check_kernels(path, calib)
        assert check.inputs == len(calib) and check.cpu == cpu
        if cpu.vnni:
            assert check.ok and check.top1_agreement == 1.0 and not check.diverging_layers, check.summary()
        elif not check.ok:
            assert check.diverging_layers and "reduce_range=True" in check.summary()
        as_json = json.loads(json.dumps(check.to_dict()))
        assert as_json["ok"] == check.ok and as_json["inputs"] == len(calib)


def test_cpu_features_read_the_flags_that_pick_the_kernels(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Some CPU\nflags\t\t: fpu sse avx2 fma\n")
    cpu = cpu_features(info)
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert cpu.vnni == bool(cpu.flags & {"avx512_vnni", "avx_vnni"})
        assert ("no VNNI" in cpu.describe()) == (not cpu.vnni)
    assert cpu_features(tmp_path / "missing").machine == platform.machine()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="the model takes"):
        check_kernels(DROP_IN, {"nope": np.zeros((2, 1, 8, 8), np.float32)})
    with pytest.raises(ValueError, match="positive number of rows"):
        check_kernels(DROP_IN, np.zeros((0, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="min_agreement"):
        check_kernels(DROP_IN, np.zeros((2, 1, 8, 8), np.float32), min_agreement=float("nan"))


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="emulates an x86 CPU")
def test_on_an_avx2_only_cpu_the_check_flags_the_brevitas_export_and_passes_onnxruntimes_output():
    """Run for real on an AVX2-only CPU model (qemu-user, installed by `make test`): the Brevitas QCDQ
    export's 8-bit weights saturate onnxruntime's u8 x s8 kernels and the check says so; onnxruntime's own
    output keeps its decisions; with reduce_range every layer computes the graph to the step."""
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "qemu-x86_64 is missing: `make test` installs Debian's qemu-user"
    out = subprocess.run(
        [qemu, "-cpu", "Haswell", sys.executable, str(PROBE), str(FIXTURES / "calib.npy"), "128",
         str(BREVITAS), str(DROP_IN), str(REDUCED)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    checks = json.loads(out.stdout.strip().splitlines()[-1])
    brevitas, drop_in, reduced = (checks[p.name] for p in (BREVITAS, DROP_IN, REDUCED))
    for check in checks.values():
        assert check["cpu"]["vnni"] is False and "no VNNI" in check["cpu"]["describe"]
    assert not brevitas["ok"] and brevitas["top1_agreement"] < 0.8
    assert "/features.0.0/Conv" in brevitas["diverging_layers"]
    assert drop_in["ok"] and drop_in["top1_agreement"] >= MIN_AGREEMENT
    assert reduced["ok"] and reduced["diverging_layers"] == [] and reduced["top1_agreement"] == 1.0


def test_a_deep_graph_is_checked_without_recursion():
    """Thousands of nodes before a layer (a transformer's graph runs deep): the walk is iterative."""
    rng = np.random.default_rng(0)
    model = _qdq_linear(rng.integers(-127, 128, (6, 16)), 0.02, rng.uniform(0.01, 0.02, 6), 0.05)
    chain = [helper.make_node("Identity", ["x" if i == 0 else f"id{i - 1}"], [f"id{i}"]) for i in range(3000)]
    model.graph.node[0].input[0] = "id2999"
    nodes = [*chain, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    check = check_kernels(model, rng.uniform(-1, 1, (8, 16)).astype(np.float32))
    assert list(check.layers) == ["fc"] and check.inputs == 8
