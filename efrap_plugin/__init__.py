"""efrap-plugin: EFRAP (Li et al., CVPR 2024) against quantization-conditioned backdoors.

The backend-neutral defense. ``defend(model, calib_data, scheme, config) -> RoundingPlan``; every route is
a ``LayerProducer`` driven by ``run``; adapters (installed beside it, one per backend) turn plans into real
int8 artifacts and verify them. The red-team kit (attacks, triggers, the model zoo, datasets, evaluation)
is ``efrap_plugin.redteam``.
"""

from .analysis import LayerScan, crowded_layers, format_scan, scan_weights
from .config import HOLDOUT_CHOICES, LAYER_INPUTS, UNITS, EFRAPConfig, LayerInputs, Unit
from .conformance import IntegerReport, compare_integers
from .data import LabeledData, as_calibration, as_labeled, labeled, load_npz, load_npz_inputs
from .defense import resolve_config, run, with_layer_inputs
from .device import resolve_device
from .engine import TorchModelProducer, capture, defend
from .errors import DataError, EFRAPError, ModelError, PlanMismatchError
from .files import atomic_write, check_writable, staged
from .held_out import (
    HeldOut,
    Measurement,
    first_outputs,
    inputs_needed,
    take_rows,
)
from .layer_inputs import mix_layer_inputs, pick_layer_inputs
from .layers import (
    CONV_TRANSPOSE,
    core_weight,
    execution_order,
    fingerprint,
    layer_kinds,
    on_device_of,
    prepare_model,
    quantizable_layers,
    relu_after,
)
from .objective import truncation_error
from .plan import LayerPlan, PlanMeta, RoundingPlan, grid_record, snap_integers
from .producer import FoundLayers, Honours, LayerProblem, LayerProducer, ProducedPlan, TensorCalibration
from .rounding import (
    LayerResult,
    learn_rounding,
)
from .schemes import SCHEME_PRESETS, QuantScheme, scheme_preset

__version__ = "0.1.0"

__all__ = [
    "FoundLayers",
    "Honours",
    "LayerProducer",
    "PlanMeta",
    "ProducedPlan",
    "TensorCalibration",
    "TorchModelProducer",
    "UNITS",
    "Unit",
    "first_outputs",
    "resolve_config",
    "run",
    "with_layer_inputs",
    "CONV_TRANSPOSE",
    "HeldOut",
    "Measurement",
    "DataError",
    "EFRAPConfig",
    "HOLDOUT_CHOICES",
    "EFRAPError",
    "IntegerReport",
    "LabeledData",
    "labeled",
    "LAYER_INPUTS",
    "LayerInputs",
    "LayerPlan",
    "LayerProblem",
    "LayerScan",
    "LayerResult",
    "ModelError",
    "PlanMismatchError",
    "QuantScheme",
    "RoundingPlan",
    "SCHEME_PRESETS",
    "as_calibration",
    "as_labeled",
    "atomic_write",
    "check_writable",
    "capture",
    "compare_integers",
    "core_weight",
    "defend",
    "execution_order",
    "fingerprint",
    "crowded_layers",
    "format_scan",
    "grid_record",
    "on_device_of",
    "mix_layer_inputs",
    "pick_layer_inputs",
    "layer_kinds",
    "learn_rounding",
    "take_rows",
    "inputs_needed",
    "load_npz",
    "load_npz_inputs",
    "prepare_model",
    "quantizable_layers",
    "relu_after",
    "scan_weights",
    "scheme_preset",
    "snap_integers",
    "staged",
    "resolve_device",
    "truncation_error",
    "__version__",
]
