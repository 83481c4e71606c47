"""Whether onnxruntime's fused int8 kernels compute what a QDQ graph says, on this CPU.

onnxruntime fuses DequantizeLinear -> op -> QuantizeLinear groups into integer kernels (QLinearConv,
QGemm, ...) picked at run time by CPU features. On x86 without VNNI, the u8 x s8 kernels add pairs of
products in 16 bits, which saturate for weights that use all 8 bits, so the deployed model can compute
something other than the graph it ships. The graph's own arithmetic (an unfused session: dequantize,
float op, quantize) is the same on every CPU; this module compares the two on the user's inputs, layer
by layer and for the whole model, so a proof run on one CPU says what it proved on which.

Only onnx, onnxruntime and numpy are imported here, so the check runs wherever the model runs.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

__all__ = [
    "CpuFeatures",
    "KernelCheck",
    "LayerDivergence",
    "check_kernels",
    "cpu_features",
    "kernel_session",
    "session_options",
]

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
"""The ops onnxruntime runs as integer kernels when a QDQ group surrounds them."""

MIN_AGREEMENT = 0.98
"""Top-1 agreement below which the fused kernels are said to change the model: onnxruntime's fused
requantization may move an output by one step (rounding), which flips a decision now and then; a
saturating kernel changes far more."""

_ROWS = 256  # inputs run per batch
_LAYER_ROWS = 64  # inputs each layer is checked on alone


@dataclass(frozen=True)
class CpuFeatures:
    """What onnxruntime's int8 kernel choice depends on, read from this machine."""

    machine: str
    model: str
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def x86(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64", "i686", "x86")

    @property
    def vnni(self) -> bool | None:
        """Whether the CPU has an int8 dot-product instruction (AVX-512 VNNI or AVX-VNNI); None off x86."""
        return bool(self.flags & {"avx512_vnni", "avx_vnni"}) if self.x86 else None

    def describe(self) -> str:
        if not self.x86:
            return f"{self.machine} ({self.model})" if self.model else self.machine
        vector = "AVX-512" if "avx512f" in self.flags else "AVX2" if "avx2" in self.flags else "SSE"
        dot = [
            name
            for flag, name in (("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"))
            if flag in self.flags
        ]
        return f"{self.model or self.machine}: {vector}, " + (
            f"{' and '.join(dot)}" if dot else "no VNNI (int8 products summed in 16 bits)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "model": self.model, "vnni": self.vnni, "describe": self.describe()}


_KNOWN_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
# numpy asks the CPU itself (CPUID) at import; its names for the flags /proc/cpuinfo also lists
_NUMPY_NAMES = {"AVX2": "avx2", "AVX512F": "avx512f", "AVX512BW": "avx512bw", "AVX512VNNI": "avx512_vnni"}


def cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuFeatures:
    """This CPU's int8-relevant features, as the running process sees them: numpy's CPUID probe where
    it has one, with ``cpuinfo``'s flags (Linux) for what numpy does not name (AVX-VNNI) only where the
    two agree on the rest; an emulated or virtual CPU can differ from the host's ``/proc/cpuinfo``."""
    listed: set[str] = set()
    model = ""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not listed:
            listed = set(value.split()) & set(_KNOWN_FLAGS)
        elif key == "model name" and not model:
            model = value.strip()
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as probed
    except ImportError:  # another numpy layout: the listed flags are all there is
        return CpuFeatures(platform.machine(), model, frozenset(listed))
    seen = {flag for name, flag in _NUMPY_NAMES.items() if probed.get(name)}
    if seen != listed & set(_NUMPY_NAMES.values()):  # /proc/cpuinfo describes another CPU than this one
        return CpuFeatures(platform.machine(), "", frozenset(seen))
    return CpuFeatures(platform.machine(), model, frozenset(listed))


@dataclass(frozen=True)
class LayerDivergence:
    """One layer run alone on the same quantized inputs, fused and exact: how far its quantized
    outputs differ, in steps of its output grid."""

    max_steps: int
    share: float
    """Share of its outputs that differ by more than one step (one is rounding)."""

    def to_dict(self) -> dict[str, float]:
        return {"max_steps": self.max_steps, "share": round(self.share, 4)}


@dataclass(frozen=True)
class KernelCheck:
    """The fused session against the graph's exact arithmetic, on ``inputs`` rows."""

    inputs: int
    top1_agreement: float
    max_error: float
    """Largest absolute difference in the model's first output."""
    output_range: float
    """Largest absolute value of that output in the exact arithmetic, to read ``max_error`` against."""
    layers: dict[str, LayerDivergence]
    """Every quantized layer checked alone, by node name, in graph order."""
    cpu: CpuFeatures
    min_agreement: float = MIN_AGREEMENT

    @property
    def ok(self) -> bool:
        """Whether the fused kernels compute the model: its decisions (top-1) kept on at least
        ``min_agreement`` of the inputs, or every layer within one step of the graph's arithmetic (a model
        whose outputs sit near ties flips on rounding alone, which no kernel can avoid)."""
        within_rounding = bool(self.layers) and not self.diverging_layers
        return self.top1_agreement >= self.min_agreement or within_rounding

    @property
    def diverging_layers(self) -> list[str]:
        """Layers whose outputs move by more than one step when run alone: where the kernels differ."""
        return [name for name, d in self.layers.items() if d.max_steps > 1]

    def summary(self) -> str:
        """One line: what was compared, on which CPU, and, where the kernels change the model, the fix."""
        line = (
            f"onnxruntime's fused int8 kernels on this CPU ({self.cpu.describe()}) agree with the model's QDQ "
            f"arithmetic on {100 * self.top1_agreement:.2f}% of {self.inputs} inputs (top-1; largest output "
            f"error {self.max_error:.3g} on outputs up to {self.output_range:.3g})"
        )
        diverging = self.diverging_layers
        if diverging:
            worst = ", ".join(f"{n} ({self.layers[n].max_steps} steps)" for n in diverging[:4])
            more = f" and {len(diverging) - 4} more" if len(diverging) > 4 else ""
            line += f"; layers whose int8 outputs differ beyond rounding: {worst}{more}"
        if self.ok:
            return line
        cause = (
            "its u8 x s8 kernels add pairs of products in 16 bits, which saturate without VNNI"
            if self.cpu.vnni is False
            else "the kernels onnxruntime picked for this CPU differ from the graph's arithmetic"
        )
        return (
            f"WARNING: {line}. The model this CPU runs is not the one verified: {cause}. Fix: quantize with "
            "reduce_range=True (7-bit weights; `efrap defend --reduce-range`), with QUInt8 weights, or run it "
            "on a CPU with AVX-512 VNNI / AVX-VNNI"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "inputs": self.inputs,
            "top1_agreement": round(self.top1_agreement, 4),
            "min_agreement": self.min_agreement,
            "max_error": round(self.max_error, 4),
            "output_range": round(self.output_range, 4),
            "diverging_layers": self.diverging_layers,
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
            "cpu": self.cpu.to_dict(),
        }


def session_options(exact: bool) -> ort.SessionOptions:
    """Options for the graph's own arithmetic (``exact``: no optimization, every node as written) or for
    what onnxruntime deploys (every optimization: QDQ fused into this CPU's integer kernels)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL if exact else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    return opts


def kernel_session(model: onnx.ModelProto | str | Path, exact: bool) -> ort.InferenceSession:
    """A CPU session over ``model`` with ``session_options(exact)``."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, session_options(exact), providers=["CPUExecutionProvider"])


def check_kernels(
    model: onnx.ModelProto | str | Path,
    inputs: np.ndarray | Mapping[str, np.ndarray],
    *,
    min_agreement: float = MIN_AGREEMENT,
    max_inputs: int = 1024,
) -> KernelCheck:
    """Run ``model`` fused (what onnxruntime deploys on this CPU) and exact (the graph's own QDQ
    arithmetic) on up to ``max_inputs`` rows of ``inputs`` (an array for a one-input model, or arrays by
    input name), and each quantized layer alone on the exact session's quantized inputs to it."""
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement: expected a share in [0, 1], got {min_agreement!r}")
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    feeds = _feeds(proto, inputs, max_inputs)
    rows = len(next(iter(feeds.values())))
    segments = _layer_segments(proto)
    cut_types = {k: v for seg in segments.values() for k, v in seg.inputs.items() if k not in feeds}
    cuts = sorted(cut_types)
    exact_model = _with_outputs(proto, cut_types)
    exact, fused = kernel_session(exact_model, exact=True), kernel_session(proto, exact=False)
    first = proto.graph.output[0].name
    step = _batch_rows(proto)
    if rows < step and step != _ROWS:
        raise ValueError(f"inputs: the model takes batches of {step} rows; got {rows}")
    agree = decisions = 0
    max_error = output_range = 0.0
    captured: dict[str, np.ndarray] = {}
    for at in range(0, rows - rows % step if step != _ROWS else rows, step):
        batch = {k: v[at : at + step] for k, v in feeds.items()}
        got = exact.run([first, *cuts], batch)
        want, kernels = got[0], fused.run([first], batch)[0]
        if at == 0:
            captured = {**{k: v[:_LAYER_ROWS] for k, v in batch.items()}, **dict(zip(cuts, got[1:]))}
        same, count = _top1_agreements(want, kernels)
        agree, decisions = agree + same, decisions + count
        diff = np.abs(want.astype(np.float64) - kernels.astype(np.float64))
        max_error = max(max_error, float(np.nanmax(diff)) if diff.size else 0.0)
        output_range = max(output_range, float(np.nanmax(np.abs(want))) if want.size else 0.0)
    layers = {name: _layer_divergence(seg, captured) for name, seg in segments.items()}
    return KernelCheck(
        inputs=rows,
        top1_agreement=agree / decisions if decisions else 1.0,
        max_error=max_error,
        output_range=output_range,
        layers=layers,
        cpu=cpu_features(),
        min_agreement=min_agreement,
    )


def _batch_rows(model: onnx.ModelProto) -> int:
    """Rows per run: the batch a model with a fixed first input dimension takes, else ``_ROWS``."""
    inits = {t.name for t in model.graph.initializer}
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim
        if i.name not in inits and dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
    return _ROWS


def _feeds(model: onnx.ModelProto, inputs: Any, max_inputs: int) -> dict[str, np.ndarray]:
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if isinstance(inputs, Mapping):
        if sorted(inputs) != sorted(names):
            raise ValueError(f"inputs: the model takes {names}, got arrays named {sorted(inputs)}")
        feeds = {k: np.asarray(inputs[k]) for k in names}
    else:
        if len(names) != 1:
            raise ValueError(f"inputs: the model takes {names}; pass a dict with one array per input")
        feeds = {names[0]: np.asarray(inputs)}
    sizes = {len(v) if v.ndim else 0 for v in feeds.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(
            f"inputs: expected arrays with the same positive number of rows, got sizes {sorted(sizes)}"
        )
    return {k: np.ascontiguousarray(v[:max_inputs]) for k, v in feeds.items()}


def _top1_agreements(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Decisions that agree, and decisions made: the class (last axis) at every other position (N, or
    N x T for a sequence model); the sign of a 1-D output."""
    if a.ndim < 2:
        return int(np.sum(np.sign(a) == np.sign(b))), a.size
    same = a.argmax(axis=-1) == b.argmax(axis=-1)
    return int(same.sum()), same.size


@dataclass(frozen=True)
class _Segment:
    """The nodes from a layer's input QuantizeLinear to its output's, as a model of its own."""

    model: onnx.ModelProto
    inputs: dict[str, int]
    """The tensors it reads, with their types."""
    output: str
    step: float
    """One step of the output's grid, in the output's units (1 where the output is the integers)."""


def _tensor_type(name: str, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]) -> int:
    if name in inits:
        return inits[name].data_type
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        return node.attribute[0].t.data_type
    return onnx.TensorProto.UINT8


def _scalar(
    name: str, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]
) -> float | None:
    """The value of a one-element initializer or Constant, or None."""
    if name in inits:
        tensor = inits[name]
    elif name in producers and producers[name].op_type == "Constant" and producers[name].attribute:
        tensor = producers[name].attribute[0].t
    else:
        return None
    value = numpy_helper.to_array(tensor)
    return (
        float(value.reshape(-1)[0]) if value.size == 1 and np.isfinite(value).all() and value != 0 else None
    )


def _q_type(q: onnx.NodeProto, inits, producers) -> int:
    """The integer type a QuantizeLinear writes (uint8 without a zero point, as ONNX defines)."""
    return (
        _tensor_type(q.input[2], inits, producers)
        if len(q.input) > 2 and q.input[2]
        else onnx.TensorProto.UINT8
    )


class _Graph:
    """A graph's lookups, built once: initializers, each tensor's producer, its inputs, and which
    tensors are constants (memoized)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.producers = {out: n for n in model.graph.node for out in n.output}
        self.inputs = {i.name: i for i in model.graph.input if i.name not in self.inits}
        self._constant: dict[str, bool] = {}

    def constant(self, name: str) -> bool:
        """Whether a tensor is computed from initializers and Constants alone; without recursion (a
        residual network's paths multiply, a transformer's graph runs deep)."""
        known, stack = self._constant, [name]
        while stack:
            top = stack[-1]
            node = self.producers.get(top)
            if top in known:
                stack.pop()
            elif top in self.inits or (node is not None and node.op_type == "Constant"):
                known[top] = True
            elif node is None:
                known[top] = False
            elif pending := [i for i in node.input if i and i not in known]:
                stack.extend(pending)
            else:
                known[top] = all(known[i] for i in node.input if i)
        return known[name]

    def upstream_of(self, q: onnx.NodeProto, starts: dict[str, int]) -> tuple[list[onnx.NodeProto], set[str]]:
        """The nodes between ``q`` and the tensors it is cut at (other activation quantizers' inputs,
        graph inputs), in graph order, and those cut tensors."""
        kept: dict[int, onnx.NodeProto] = {}
        cut: set[str] = set()
        seen: set[str] = set()
        stack = [q.output[0]]
        while stack:
            name = stack.pop()
            if name in seen or not name:
                continue
            seen.add(name)
            if name in self.inputs or (name in starts and name != q.input[0]):
                cut.add(name)
                continue
            node = self.producers.get(name)
            if node is None or name in self.inits:
                continue
            kept[id(node)] = node
            stack.extend(node.input)
        return [n for n in self.model.graph.node if id(n) in kept], cut


def _layer_segments(model: onnx.ModelProto) -> dict[str, _Segment]:
    """Each quantized compute node's segment, cut so it runs alone: from the float tensors its input
    QuantizeLinear reads (or graph inputs) to the activation QuantizeLinear after it."""
    g = _Graph(model)
    act_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and not g.constant(n.input[0])]
    # a layer starts at the float tensor its input QuantizeLinear reads (so the segment holds the same
    # Q -> DQ pair onnxruntime converts and fuses in the whole graph) and ends at its output's QuantizeLinear
    starts = {q.input[0]: _tensor_type(q.input[1], g.inits, g.producers) for q in act_q}
    segments: dict[str, _Segment] = {}
    for q in act_q:
        nodes, cut = g.upstream_of(q, starts)
        compute = [n for n in nodes if n.op_type in COMPUTE_OPS]
        if len(compute) != 1 or not any(c in starts for c in cut):
            continue  # no layer here, or one this check cannot isolate
        segments[compute[0].name or compute[0].output[0]] = _segment(g, q, nodes, cut, starts)
    return segments


def _segment(
    g: _Graph, q: onnx.NodeProto, nodes: list[onnx.NodeProto], cut: set[str], starts: dict[str, int]
) -> _Segment:
    """``nodes`` as a model of their own, reading ``cut`` and ending where the graph dequantizes ``q``'s
    output (onnxruntime fuses a layer whose output is dequantized again, as it is in the graph), read back
    in steps of that scale; at ``q``'s integers where nothing dequantizes them."""
    out = q.output[0]
    dq = next((n for n in g.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == out), None)
    step = _scalar(dq.input[1], g.inits, g.producers) if dq is not None else None
    order = list(nodes)
    if dq is not None and step:
        order += [g.producers[i] for i in dq.input[1:] if i in g.producers and g.producers[i] not in order]
        order.append(dq)
        end, end_type = dq.output[0], _tensor_type(dq.input[1], g.inits, g.producers)
    else:
        end, end_type, step = out, _q_type(q, g.inits, g.producers), 1.0
    needed = {i for n in order for i in n.input}
    inputs = [
        g.inputs[c] if c in g.inputs else helper.make_tensor_value_info(c, starts[c], None)
        for c in sorted(cut)
    ]
    graph = helper.make_graph(
        order,
        f"segment_{out}",
        inputs,
        [helper.make_tensor_value_info(end, end_type, None)],
        [t for name, t in g.inits.items() if name in needed],
    )
    model = helper.make_model(graph, opset_imports=g.model.opset_import, ir_version=g.model.ir_version)
    return _Segment(model, {v.name: v.type.tensor_type.elem_type for v in inputs}, end, step)


def _with_outputs(model: onnx.ModelProto, outputs: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``outputs`` (name: type), for the exact session,
    whose arithmetic extra outputs do not change."""
    if not outputs:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(helper.make_tensor_value_info(n, t, None) for n, t in outputs.items())
    return copy


def _layer_divergence(segment: _Segment, captured: dict[str, np.ndarray]) -> LayerDivergence:
    feeds = {name: captured[name] for name in segment.inputs}
    exact = kernel_session(segment.model, exact=True).run([segment.output], feeds)[0]
    fused = kernel_session(segment.model, exact=False).run([segment.output], feeds)[0]
    steps = np.rint(np.abs(exact.astype(np.float64) - fused.astype(np.float64)) / segment.step)
    return LayerDivergence(
        int(steps.max()) if steps.size else 0, float(np.mean(steps > 1)) if steps.size else 0.0
    )
