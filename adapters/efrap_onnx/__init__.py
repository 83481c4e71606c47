"""efrap-plugin's ONNX / onnxruntime adapter: defended QDQ models that onnxruntime runs."""

from .export import export_defended, export_float_onnx, onnx_plan
from .model_io import load_onnx, save_onnx
from .quantize import ListDataReader, defend_qdq, quantize_images, quantize_static, session
from .verify import VerifyReport, optimized_op_counts, verify

__all__ = [
    "ListDataReader",
    "VerifyReport",
    "defend_qdq",
    "export_defended",
    "export_float_onnx",
    "load_onnx",
    "onnx_plan",
    "optimized_op_counts",
    "quantize_images",
    "quantize_static",
    "save_onnx",
    "session",
    "verify",
]
