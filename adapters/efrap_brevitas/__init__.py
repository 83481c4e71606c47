"""efrap-plugin's Brevitas adapter: Brevitas int8 models on EFRAP's integers, exported to QCDQ ONNX."""

from .qcdq import export_qcdq, quantize_brevitas, read_qcdq_integers, verify_qcdq

__all__ = ["export_qcdq", "quantize_brevitas", "read_qcdq_integers", "verify_qcdq"]
