"""efrap-plugin's ONNX / onnxruntime adapter: defended QDQ models that onnxruntime runs."""

from .defend import QDQProducer, defend_qdq
from .drop_in import ListDataReader, quantize, quantize_images, quantize_static
from .export import export_defended, export_float_onnx, onnx_plan
from .graph import folded_weights
from .kernels import CpuFeatures, KernelCheck, check_kernels, cpu_features
from .model_io import Prepared, check_onnx, input_names, load_onnx, prepare, save_onnx
from .runtime import session
from .snap import snap
from .verify import (
    VerifyReport,
    kernel_check,
    optimized_op_counts,
    quantized_weights,
    verify,
    weight_integers,
)

__all__ = [
    "snap",
    "QDQProducer",
    "CpuFeatures",
    "KernelCheck",
    "ListDataReader",
    "Prepared",
    "VerifyReport",
    "check_kernels",
    "check_onnx",
    "cpu_features",
    "defend_qdq",
    "export_defended",
    "export_float_onnx",
    "folded_weights",
    "input_names",
    "kernel_check",
    "load_onnx",
    "onnx_plan",
    "optimized_op_counts",
    "prepare",
    "quantize",
    "quantize_images",
    "quantize_static",
    "quantized_weights",
    "save_onnx",
    "session",
    "verify",
    "weight_integers",
]
