"""efrap-plugin's Brevitas adapter: EFRAP on the user's own Brevitas model, as its quantizers' rounding.

``defend_quant_model(model, calib)`` after the user's ``calibration_mode`` pass (or build layers with
``weight_quant=with_efrap(TheirQuantizer)``); ``export_onnx_qcdq`` as usual; ``verify_qcdq`` reads the
integers back. ``quantize_brevitas`` builds an int8 Brevitas model from a plain torch model (the CLI's).
"""

from .defend import BrevitasProducer, apply_plan, defend_quant_model, quant_layers
from .grid import LayerGrid, layer_grid, quantizer_scheme
from .mode import efrap_mode
from .qcdq import (
    QCDQWeight,
    export_qcdq,
    quantize_brevitas,
    read_qcdq_integers,
    read_qcdq_weights,
    verify_qcdq,
)
from .rounding import EFRAPRound, install_rounding, with_efrap

__all__ = [
    "efrap_mode",
    "BrevitasProducer",
    "EFRAPRound",
    "LayerGrid",
    "QCDQWeight",
    "apply_plan",
    "defend_quant_model",
    "export_qcdq",
    "install_rounding",
    "layer_grid",
    "quant_layers",
    "quantize_brevitas",
    "quantizer_scheme",
    "read_qcdq_integers",
    "read_qcdq_weights",
    "verify_qcdq",
    "with_efrap",
]
