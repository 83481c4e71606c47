"""efrap-plugin: EFRAP (Li et al., CVPR 2024) against quantization-conditioned backdoors.

The backend-neutral defense. ``defend(model, calib_data, scheme, config) -> RoundingPlan``; every route is
a ``LayerProducer`` driven by ``run``; adapters (installed beside it, one per backend) turn plans into real
int8 artifacts and verify them. The red-team kit (attacks, triggers, the model zoo, datasets, evaluation)
is ``efrap_plugin.redteam``.
"""

from .analysis import LayerScan, crowded_layers, format_scan, scan_weights
from .config import BUDGET_ONLY, HOLDOUT_CHOICES, LAYER_INPUTS, UNITS, EFRAPConfig, LayerInputs, Unit
from .conformance import IntegerReport, compare_integers
from .data import LabeledData, as_calibration, as_labeled, labeled, load_npz, load_npz_inputs
from .defense import resolve_config, run, with_layer_inputs
from .device import resolve_device
from .engine import TorchModelProducer, capture, defend
from .errors import DataError, EFRAPError, ModelError, PlanMismatchError
from .fake_quant import fake_quant_forward
from .files import atomic_write, check_writable, read_safetensors, safetensors_shapes, staged
from .held_out import (
    MIN_HOLDOUT,
    HeldOut,
    Measurement,
    first_outputs,
    held_out_indices,
    inputs_needed,
    split_calibration,
    split_sizes,
    take_rows,
)
from .layer_inputs import check_layer_inputs, mix_layer_inputs, pick_layer_inputs
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
from .loop import defend_layers, warn_tied_weights
from .objective import learnable_bounds, truncation_error
from .plan import LayerPlan, PlanMeta, RoundingPlan, grid_record, snap_integers, snap_weight
from .producer import FoundLayers, Honours, LayerProblem, LayerProducer, ProducedPlan, TensorCalibration
from .rounding import (
    BUDGET_STRENGTHS,
    LayerResult,
    budget_strengths,
    learn_rounding,
    path_steps,
    rounding_path,
)
from .schemes import SCHEME_PRESETS, ActivationQuantizer, QuantScheme, scheme_preset

__version__ = "0.1.0"

__all__ = [
    "BUDGET_ONLY",
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
    "BUDGET_STRENGTHS",
    "CONV_TRANSPOSE",
    "HeldOut",
    "Measurement",
    "MIN_HOLDOUT",
    "ActivationQuantizer",
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
    "check_layer_inputs",
    "budget_strengths",
    "atomic_write",
    "check_writable",
    "capture",
    "compare_integers",
    "core_weight",
    "defend",
    "defend_layers",
    "execution_order",
    "fake_quant_forward",
    "fingerprint",
    "crowded_layers",
    "format_scan",
    "grid_record",
    "on_device_of",
    "mix_layer_inputs",
    "pick_layer_inputs",
    "layer_kinds",
    "learn_rounding",
    "path_steps",
    "rounding_path",
    "split_calibration",
    "split_sizes",
    "take_rows",
    "learnable_bounds",
    "held_out_indices",
    "inputs_needed",
    "load_npz",
    "load_npz_inputs",
    "prepare_model",
    "quantizable_layers",
    "relu_after",
    "read_safetensors",
    "safetensors_shapes",
    "scan_weights",
    "scheme_preset",
    "snap_integers",
    "snap_weight",
    "staged",
    "resolve_device",
    "truncation_error",
    "warn_tied_weights",
    "__version__",
]
