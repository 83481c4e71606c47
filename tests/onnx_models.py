"""Small ONNX graphs built by hand for the tests: a Conv model, and the hostile variants users send."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def external(tensor: TensorProto, location: str, **fields: int) -> TensorProto:
    """Move ``tensor``'s data out of the protobuf: it now points at ``location`` (offset / length too)."""
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    for key, value in fields.items():
        tensor.external_data.add(key=key, value=str(value))
    return tensor


def conv_model(
    weight: np.ndarray | None = None,
    location: str | None = None,
    opset: int = 17,
    batch: str | int = "N",
    extra_nodes: tuple = (),
    domains: tuple[str, ...] = (),
):
    """input (batch x 1 x 8 x 8) -> Conv (4 filters 3x3, initializer 'w') -> Relu -> logits (batch x 144).

    ``extra_nodes`` are inserted after the Relu and must map 'r' to 'r2'.
    """
    if weight is None:
        weight = np.random.default_rng(0).standard_normal((4, 1, 3, 3)).astype(np.float32)
    init = numpy_helper.from_array(weight, "w")
    if location is not None:
        external(init, location)
    last = "r2" if extra_nodes else "r"
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        *extra_nodes,
        helper.make_node("Flatten", [last], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 144])],
        [init],
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def graph_model(
    nodes: list,
    inputs: dict[str, tuple[int, list]],
    outputs: dict[str, list],
    weights: dict[str, tuple[int, ...]],
    seed: int = 0,
):
    """A one-graph opset-17 model: ``inputs`` name -> (element type, shape), ``outputs`` name -> float
    shape, ``weights`` name -> shape of a standard-normal float32 initializer (seeded)."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, kind, shape) for name, (kind, shape) in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs.items()],
        [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
