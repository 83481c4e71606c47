"""Loading untrusted ONNX files safely, and writing them atomically.

A model file is untrusted input: its external data must stay inside the model's folder and inside
the data files' bounds, its ops must be ones onnxruntime runs without custom libraries, and no
tensor it computes may need more memory than the work could ever use.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization.shape_inference import quant_pre_process

from efrap_plugin import ModelError, atomic_write, check_writable

from .runtime import first_line

__all__ = [
    "load_onnx",
    "check_onnx",
    "save_onnx",
    "initializer_array",
    "preprocess",
    "prepare",
    "Prepared",
    "MAX_TENSOR_BYTES",
    "MIN_OPSET",
]

log = logging.getLogger(__name__)

MAX_TENSOR_BYTES = 4 << 30
"""The largest tensor (at batch 1) a model may compute or hold before it is refused as a memory bomb."""
MIN_OPSET = 10
"""The oldest ai.onnx opset onnxruntime's quantizer works with (QuantizeLinear / DequantizeLinear)."""
_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")
_MAX_NAME = 255


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def _check_external(tensor: onnx.TensorProto, folder: Path) -> None:
    """Refuse external data that leaves ``folder``, is malformed, or reaches past the end of its file."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    where = f"model: tensor {tensor.name!r} points at external data {location!r}"
    if (
        not location
        or "\0" in location
        or len(location) > 4096
        or any(len(part) > _MAX_NAME for part in location.split("/"))
    ):
        raise ModelError(f"{where}: not a usable file name; keep external data files next to the model")
    try:
        target = (folder / location).resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # missing file, symlink loop
        raise ModelError(
            f"{where}: cannot be opened in {folder} ({exc}); keep the data next to the model"
        ) from None
    if os.path.isabs(location) or folder not in target.parents or not target.is_file():
        raise ModelError(
            f"{where} outside the model's folder {folder}; refusing to read it (path traversal). "
            "Keep external data next to the model."
        )
    try:
        offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
    except ValueError:
        raise ModelError(f"{where}: offset / length are not integers") from None
    size = target.stat().st_size
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize if tensor.data_type else 1
    needed = length if length >= 0 else math.prod(tensor.dims) * itemsize
    if offset < 0 or needed < 0 or offset + needed > size:
        raise ModelError(
            f"{where}: offset {offset} + length {needed} reaches past the end of the file ({size} bytes); "
            "the model or its data file is damaged"
        )


def _check_ops(model: onnx.ModelProto, path: str | Path) -> None:
    opsets = {o.domain: o.version for o in model.opset_import}
    version = opsets.get("", opsets.get("ai.onnx"))
    if version is not None and version < MIN_OPSET:
        raise ModelError(
            f"model: {path} uses ai.onnx opset {version}; quantization needs opset >= {MIN_OPSET}. "
            "Re-export it with a newer opset (or onnx.version_converter.convert_version)"
        )
    custom = sorted({n.domain for n in model.graph.node if n.domain not in _STANDARD_DOMAINS})
    if custom:
        raise ModelError(
            f"model: {path} uses ops of custom domains {custom}; efrap needs a model onnxruntime runs "
            "without custom op libraries"
        )


def _check_memory(model: onnx.ModelProto, path: str | Path) -> None:
    """Refuse a graph whose static shapes (batch 1, data propagated) ask for a tensor over the limit."""
    if model.ByteSize() >= onnx.checker.MAXIMUM_PROTOBUF:
        log.warning("model: %s is over 2 GB; its tensor sizes are not checked before running it", path)
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # onnx raises several unrelated types here
        raise ModelError(f"model: {path} fails ONNX shape inference ({exc})") from None
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        kind = vi.type.tensor_type
        if not kind.elem_type:
            continue
        numel = math.prod(max(d.dim_value, 1) if d.HasField("dim_value") else 1 for d in kind.shape.dim)
        nbytes = numel * onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type).itemsize
        if nbytes > MAX_TENSOR_BYTES:
            raise ModelError(
                f"model: {path}: tensor {vi.name!r} would take {nbytes / 2**30:.1f} GiB at batch 1 (the limit "
                f"is {MAX_TENSOR_BYTES / 2**30:.0f} GiB); refusing a model that would exhaust memory"
            )


def load_onnx(path: str | Path, check_finite: bool = True) -> onnx.ModelProto:
    """Parse ``path`` without following external data first; refuse data outside the model's folder."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model: {path} does not exist; pass the path of a float .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(
            f"model: {path} is not a readable ONNX protobuf ({type(exc).__name__}: {exc})"
        ) from None
    if not model.graph.node:
        raise ModelError(f"model: {path} parsed but holds no graph nodes; is it really an ONNX model?")
    folder = path.resolve().parent
    external = [t for t in _graph_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        _check_external(tensor, folder)
    _check_ops(model, path)
    if external:
        try:
            onnx.load_external_data_for_model(model, str(folder))
        except Exception as exc:
            raise ModelError(f"model: {path}: its external data cannot be read ({exc})") from None
    return check_onnx(model, path, check_finite)


def input_names(model: onnx.ModelProto) -> list[str]:
    """The graph's inputs that calibration data feeds (initializers listed as inputs left out)."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def check_onnx(model: onnx.ModelProto, where: str | Path, check_finite: bool = True) -> onnx.ModelProto:
    """The checks every model gets, read from a file or handed over in memory: custom ops, opset, the
    ONNX checker, tensors over the memory limit, NaN / Inf weights. Returns ``model``."""
    if not isinstance(model, onnx.ModelProto):
        raise ModelError(f"model: expected an onnx.ModelProto or a path, got {type(model).__name__}")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _graph_tensors(model.graph)):
        raise ModelError(
            f"model: {where} keeps tensors in external data files that an in-memory model cannot locate; "
            "pass the model's path instead"
        )
    if not model.graph.node:
        raise ModelError(f"model: {where} holds no graph nodes")
    _check_ops(model, where)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(f"model: {where} fails the ONNX checker ({exc})") from None
    _check_memory(model, where)
    if check_finite:
        for tensor in model.graph.initializer:
            arr = initializer_array(tensor)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise ModelError(
                    f"model: initializer {tensor.name!r} holds NaN or Inf values; fix the model before quantizing"
                )
    return model


def preprocess(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` through onnxruntime's quant_pre_process (folds BatchNorm), with its failures made clear
    and its litter removed; ``model`` itself is left as it was.

    When symbolic shape inference fails it saves ``sym_shape_infer_temp.onnx`` and a data file into the
    working folder; those are removed here, as they are not the user's. When its graph optimisation
    fails it logs the whole traceback and goes on: that becomes one warning line here.
    """
    litter = Path("sym_shape_infer_temp.onnx")
    before = set(Path.cwd().iterdir()) if not litter.exists() else None
    try:
        with tempfile.TemporaryDirectory(prefix="efrap-onnx-") as tmp, _PreProcessLog() as messages:
            src, out = Path(tmp) / "in.onnx", Path(tmp) / "pre.onnx"
            onnx.save(model, str(src))
            quant_pre_process(str(src), str(out))
            pre = onnx.load(str(out))
        if messages:
            log.warning(
                "onnxruntime's quant_pre_process could not optimise the model (%s); it went on without "
                "folding BatchNorm",
                messages[-1],
            )
        return pre
    except OSError:  # the file system refused (a full disk, a file-size limit): not the model's fault
        raise
    except Exception as exc:
        cause = f"{type(exc).__name__}: {exc}" if str(exc).strip() else f"{type(exc).__name__}, no message"
        found = shape_error(model)
        if found:  # the graph itself is inconsistent: nothing downstream would run it
            raise ModelError(
                f"model: onnxruntime's quant_pre_process cannot prepare it ({cause}); ONNX shape inference "
                f"finds {found}"
            ) from None
        # onnxruntime's quantize_static quantizes a graph its pre-processing cannot prepare, as it is
        log.warning(
            "onnxruntime's quant_pre_process cannot prepare the model (%s); quantizing the graph as it is "
            "(no BatchNorm folded, no shapes inferred), as onnxruntime's quantize_static does",
            first_line(exc) if str(exc).strip() else cause,
        )
        return model
    finally:
        if before is not None:
            for leftover in set(Path.cwd().iterdir()) - before:
                if leftover.name.startswith("sym_shape_infer_temp") or leftover.suffix == ".data":
                    leftover.unlink(missing_ok=True)


@dataclass(frozen=True)
class Prepared:
    """A float model read, checked and through quant_pre_process once (``prepare``): folded_weights,
    quantize_images and quantize_static take it as it is, without a second check or pre-processing."""

    model: onnx.ModelProto


def prepare(model: str | Path | onnx.ModelProto, where: str | Path | None = None) -> Prepared:
    """``model`` (a path, or a loaded model, which is left as it was) read and checked, then
    pre-processed; ``where`` names an in-memory model in errors."""
    if isinstance(model, onnx.ModelProto):
        return Prepared(preprocess(check_onnx(model, where or "model")))
    return Prepared(preprocess(load_onnx(model)))


def shape_error(model: onnx.ModelProto) -> str:
    """ONNX's strict shape inference on ``model``: its first complaint (it names the node), or ''."""
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        return first_line(exc).removeprefix("[ShapeInferenceError] Inference error(s): ")
    return ""


class _PreProcessLog(logging.Filter):
    """Holds back what quant_pre_process logs at ERROR when its graph optimisation fails (which it
    recovers from): a one-line notice, dropped, and the traceback, whose last line (the cause) is kept."""

    _logger = logging.getLogger("onnxruntime.quantization.shape_inference")

    def __enter__(self) -> list[str]:
        self.messages: list[str] = []
        self._logger.addFilter(self)
        return self.messages

    def __exit__(self, *exc: object) -> None:
        self._logger.removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        lines = record.getMessage().strip().splitlines()
        if len(lines) > 1:
            self.messages.append(lines[-1])
        return False


def initializer_array(tensor: onnx.TensorProto) -> np.ndarray:
    """An initializer's values (int4 widened to int8); a tensor whose bytes do not fill its declared
    shape, or whose element type onnx does not know, which the ONNX checker lets through, is a ModelError
    naming it."""
    try:
        arr = numpy_helper.to_array(tensor)
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelError(
            f"model: initializer {tensor.name!r} does not hold the data its type and shape declare ({exc}); "
            "the file is damaged"
        ) from None
    if arr.dtype.name in ("int4", "uint4"):
        arr = arr.astype(np.int8 if arr.dtype.name == "int4" else np.uint8)
    return arr


_SOURCE_TRACES = ("pkg.torch.onnx.stack_trace",)
"""Node metadata torch's exporter writes: Python stack traces, with the source paths of the machine that
exported the model. A model efrap-plugin writes does not tell where it was made."""


def _drop_source_traces(model: onnx.ModelProto) -> None:
    graphs = [model.graph, *(f for f in model.functions)]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            kept = [p for p in node.metadata_props if p.key not in _SOURCE_TRACES]
            if len(kept) != len(node.metadata_props):
                del node.metadata_props[:]
                node.metadata_props.extend(kept)
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.HasField("g") else [])
                graphs.extend(attr.graphs)


def save_onnx(model: onnx.ModelProto, path: str | Path, external_data: bool = False) -> Path:
    """Serialise then rename into place: a failure never leaves a half-written model.

    ``external_data`` (quantize_static's ``use_external_data_format``): every tensor goes to
    ``<name>.data`` beside the model, as onnxruntime writes it (models over 2 GB need it); ``model`` is
    converted in place. The data file is renamed into place first, so the model never points at
    missing data.
    """
    path = check_writable(path)
    _drop_source_traces(model)
    if not external_data:
        return atomic_write(path, model.SerializeToString())
    from onnx.external_data_helper import convert_model_to_external_data

    data = path.name + ".data"
    path.parent.mkdir(parents=True, exist_ok=True)
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=data, convert_attribute=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        onnx.save_model(model, str(Path(tmp) / path.name))
        if (Path(tmp) / data).exists():  # tensors under 1 KiB stay inside, as onnxruntime keeps them
            os.replace(Path(tmp) / data, path.parent / data)
        os.replace(Path(tmp) / path.name, path)
    return path
