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

__all__ = ["session", "run_output"]

_MAX_QUOTED = 600  # characters of a backend's error message quoted in ours


def session(model: onnx.ModelProto | str | Path, outputs: list[str] | None = None) -> ort.InferenceSession:
    """A CPU InferenceSession, optionally exposing intermediate tensors as extra outputs.

    A model onnxruntime cannot load (an opset it does not know, an op it lacks) is a ModelError.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if isinstance(model, onnx.ModelProto):
        if outputs:
            model = onnx.ModelProto.FromString(model.SerializeToString())
            have = {o.name for o in model.graph.output}
            for name in outputs:
                if name not in have:
                    model.graph.output.append(
                        onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                    )
        source: Any = model.SerializeToString()
    else:
        source = str(model)
    try:
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's pybind errors share no public base class
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if len(first) > _MAX_QUOTED:
            first = first[:_MAX_QUOTED] + " ..."
        raise ModelError(
            f"model: onnxruntime {ort.__version__} cannot run it ({first}); export it with an opset and ops "
            "this onnxruntime supports"
        ) from None


def run_output(sess: ort.InferenceSession, batches: list[dict[str, np.ndarray]], name: str) -> torch.Tensor:
    """Tensor ``name`` for every batch, concatenated (inputs the session does not take are dropped)."""
    feeds = {i.name for i in sess.get_inputs()}
    return torch.cat(
        [torch.from_numpy(sess.run([name], {k: v for k, v in b.items() if k in feeds})[0]) for b in batches]
    )
