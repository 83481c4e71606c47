"""onnxruntime sessions over untrusted models: a model it cannot load is a clear error, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto

from efrap_plugin import ModelError

from .kernels import session_options

__all__ = ["first_line", "run_output", "session", "upstream"]

_MAX_QUOTED = 600  # characters of a backend's error message quoted in ours


def upstream(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are the tensors ``outputs``, holding only the nodes, initializers
    and inputs they are computed from: onnxruntime runs every node of a graph whatever is fetched, so a
    layer's inputs cost the model's prefix, not the whole model. A graph with subgraphs (If, Loop, Scan
    read outer tensors implicitly) keeps all its nodes."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    nested = any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in graph.node
        for a in n.attribute
    )
    needed: set[str] = set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None:
            stack.extend(i for i in node.input if i)
    nodes = list(graph.node) if nested else [n for n in graph.node if any(o in needed for o in n.output)]
    if nested:
        needed |= {i for n in graph.node for i in n.input}
    result = onnx.ModelProto()
    result.CopyFrom(model)
    kept = result.graph
    del kept.node[:]
    kept.node.extend(nodes)
    initializers = [t for t in graph.initializer if t.name in needed]
    del kept.initializer[:]
    kept.initializer.extend(initializers)
    inputs = [i for i in graph.input if i.name in needed]
    del kept.input[:]
    kept.input.extend(inputs)
    del kept.output[:]
    types = _tensor_types(model)
    if any(name not in types for name in outputs) and _holds_float16(model):
        try:  # a float16 graph's intermediate tensors: their types, as ONNX infers them
            types.update(_tensor_types(onnx.shape_inference.infer_shapes(model)))
        except Exception:  # noqa: BLE001 - inference is a best effort; float32 is the default
            pass
    kept.output.extend(
        onnx.helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), None) for name in outputs
    )
    return result


def _holds_float16(model: onnx.ModelProto) -> bool:
    graph = model.graph
    return any(t.data_type == TensorProto.FLOAT16 for t in graph.initializer) or any(
        v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in graph.input
    )


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of the tensors a graph declares (value_info, inputs, outputs), and of each
    DequantizeLinear's output (its scale's type: float16 in a float16 graph)."""
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    inits = {t.name: t.data_type for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) > 1 and node.input[1] in inits:
            types.setdefault(node.output[0], inits[node.input[1]])
    return {k: v for k, v in types.items() if v != TensorProto.UNDEFINED}


def session(
    model: onnx.ModelProto | str | Path, outputs: list[str] | None = None, *, exact: bool = False
) -> ort.InferenceSession:
    """A CPU InferenceSession; with ``outputs``, of the part of the model that computes those tensors
    (``upstream``), which become its outputs. ``exact`` runs the graph's own arithmetic, node by node
    (no QDQ fused into the integer kernels this CPU picks): the same answers on every CPU.

    A model onnxruntime cannot load (an opset it does not know, an op it lacks) is a ModelError.
    """
    opts = session_options(exact)
    if isinstance(model, onnx.ModelProto):
        if outputs:
            model = upstream(model, outputs)
        source: Any = model.SerializeToString()
    else:
        source = str(model)
    try:
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's pybind errors share no public base class
        raise ModelError(
            f"model: onnxruntime {ort.__version__} cannot run it ({first_line(exc)}); export it with an "
            "opset and ops this onnxruntime supports"
        ) from None


def first_line(exc: Exception) -> str:
    """A backend error's first line (its type where it says nothing), cut to a readable length."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return first[:_MAX_QUOTED] + " ..." if len(first) > _MAX_QUOTED else first


def run_output(
    sess: ort.InferenceSession, batches: list[dict[str, np.ndarray]], name: str, what: str = "the model"
) -> torch.Tensor:
    """Tensor ``name`` for every batch, in one tensor filled batch by batch (no second copy for a
    concatenation: a layer's cached activations are the largest allocation of a defense); inputs the
    session does not take are dropped. Rows in proportion to the batch's (N x ..., or a reshaped N*T x D)
    fill the one tensor; any other shape is concatenated. A run onnxruntime fails is a ModelError that
    names ``what`` was run."""
    feeds = {i.name for i in sess.get_inputs()}
    sizes = [len(next(iter(b.values()))) for b in batches]
    out: torch.Tensor | None = None
    parts: list[torch.Tensor] = []
    at = per = 0
    for batch, rows in zip(batches, sizes):
        try:
            part = torch.from_numpy(sess.run([name], {k: v for k, v in batch.items() if k in feeds})[0])
        except Exception as exc:  # onnxruntime's pybind errors share no public base class
            raise ModelError(
                f"model: {what} does not run in onnxruntime {ort.__version__} ({first_line(exc)})"
            ) from None
        if out is None and not parts and part.ndim > 0 and part.shape[0] % rows == 0:
            per = part.shape[0] // rows  # 1, or T where a graph reshaped N x T x D to N*T x D
            out = torch.empty((per * sum(sizes), *part.shape[1:]), dtype=part.dtype)
        if out is not None and part.shape == (per * rows, *out.shape[1:]):
            out[at : at + len(part)] = part
            at += len(part)
            continue
        if out is not None:  # out of proportion after all: concatenate, what was filled so far first
            parts, out = [out[:at]], None
        parts.append(part)
    return out if out is not None else torch.cat(parts)
